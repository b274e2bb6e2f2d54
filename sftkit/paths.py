"""Well-known locations inside the repository, independent of the notebook's working directory."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = REPO_ROOT / "data"
TINY_MODEL_DIR: Path = DATA_DIR / "tiny-base"
WORLD_DIR: Path = DATA_DIR / "world"
OUTPUTS_DIR: Path = REPO_ROOT / "outputs"
