"""`eqr engine`: TensorRT engines for an existing export directory, built on the target (no torch)."""
from __future__ import annotations

import json

import click

from eqr.commands.export import dla_core_option, profile_batch_option, workspace_option
from eqr.commands.options import force_option, output_options, precision_option
from eqr.contract.artifact import PRECISIONS
from eqr.contract.progress import Progress


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@precision_option(default=(), choices=tuple(PRECISIONS),
                  help="Engine(s) to build: repeat the flag or give a comma list [default: every step graph in "
                       "EXPORT_DIR].")
@profile_batch_option(default=None, help="TensorRT optimization profile over the batch dimension "
                                         "[default: the export's, manifest.json \"batch\"].")
@workspace_option
@dla_core_option
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="TensorRT timing cache to read and update [default: one per GPU and TensorRT version in "
                   "~/.cache/eqr/tensorrt/ or $EQR_CACHE_DIR].")
@force_option(help="Rebuild engines the manifest already records (and remove the files they replace).")
@output_options
def engine(export_dir: str, precision: tuple[str, ...], batch: str | None, workspace_mib: int, dla_core: int | None,
           timing_cache: str | None, force: bool, as_json: bool, quiet: bool, verbose: int) -> None:
    """Build TensorRT engines for EXPORT_DIR's step graphs on this machine's GPU.

    An engine is tied to the TensorRT version and the GPU that built it, so build it where it
    runs (a Jetson, a Triton container) from an export made anywhere: this needs TensorRT and
    Polygraphy (pip install 'eqr[tensorrt]'; on Jetson, JetPack's tensorrt), not torch or ONNX
    Runtime. Engines, their sidecars and the manifest entries are those `eqr export --engine`
    writes; the manifest is printed as JSON with --json.

    \b
    Examples:
      eqr engine sudoku-small-eqr --precision fp16
      eqr engine sudoku-small-eqr --precision fp16,int8 --batch 1:16:64 --workspace-mib 1024
      eqr engine sudoku-small-eqr --precision int8 --batch 32 --dla-core 0 --force   # Jetson DLA

    \b
    Exit status: 0 built; 1 TensorRT could not build an engine; 2 bad input (directory, flags, an
    engine already recorded without --force), or TensorRT, Polygraphy or a GPU missing.
    """
    from eqr.export.config import parse_batch
    from eqr.export.engines import EngineConfig, add_engines

    config = EngineConfig(precision=precision, batch=parse_batch(batch) if batch else None,
                          workspace_mib=workspace_mib, dla_core=dla_core, timing_cache=timing_cache, force=force)
    manifest = add_engines(export_dir, config, Progress(quiet))
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
