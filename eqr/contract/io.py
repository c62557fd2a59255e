"""Atomic file writes, file hashing and safe .npz reads, shared by checkpoints, exports and reports."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from eqr.contract.errors import EqRError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for writing; rename it over `path` only on success.

    An interrupted write (exception, KeyboardInterrupt, kill before the rename) never leaves
    a partial file at `path`; the temp file is removed on any exception.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode of a new file
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


NPZ_FIX = "write it with numpy.savez(path, name=array, ...)"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an empty one)
_NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: str | os.PathLike[str], where: str) -> dict[str, np.ndarray]:
    """Every array of an .npz, read without pickles; a one-line EqRError `where: problem; fix` otherwise."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise EqRError(f"{where}: no such file") from None
    except OSError as e:
        raise EqRError(f"{where}: cannot be read ({e.strerror})") from None
    if magic.startswith(_NPY_MAGIC):
        raise EqRError(f"{where}: is a .npy file (one unnamed array), not an .npz archive of named arrays; {NPZ_FIX}")
    if not magic.startswith(_ZIP_MAGIC):
        raise EqRError(f"{where}: is not an .npz archive (it does not start like one); {NPZ_FIX}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise EqRError(f"{where}: damaged .npz archive ({e}); write it again") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise EqRError(f"{where}: holds pickled Python objects, which eqr never loads (unpickling can run "
                           "code); store plain numeric arrays") from None
        raise EqRError(f"{where}: unreadable array in the archive ({e}); {NPZ_FIX}") from None
    return arrays


# An .npz of puzzles names its token array either way ('tokens', the step input, or 'inputs', the
# data sets' name); when both are there, 'tokens' is read.
PUZZLE_KEYS = ("tokens", "inputs")


def puzzle_key(arrays: dict[str, np.ndarray]) -> str | None:
    """The key of the puzzle array in a read .npz (None when it has neither)."""
    return next((key for key in PUZZLE_KEYS if key in arrays), None)
