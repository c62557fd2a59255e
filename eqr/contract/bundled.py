"""The models shipped inside the package: eqr/bundled/<name>/ holds model.pt (an eqr
checkpoint), card.json and card.md (its measured model card). File layout only, no torch, so
`eqr models` and the card writers run on the edge install."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_FILE = "model.pt"
CARD_JSON, CARD_MD = "card.json", "card.md"


def bundled_dir() -> Path:
    return Path(str(resources.files("eqr") / "bundled"))


def bundled_names() -> list[str]:
    root = bundled_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{BUNDLED_FILE}")) if root.is_dir() else []
