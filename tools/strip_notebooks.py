"""Strip outputs, execution counts and run metadata from notebooks, in place.

    python tools/strip_notebooks.py                 # all notebooks/*.ipynb
    python tools/strip_notebooks.py a.ipynb b.ipynb
    python tools/strip_notebooks.py --check         # exit 1 listing notebooks that need stripping

Cell tags (e.g. ``parameters``) and the kernelspec are kept; a notebook that is already clean is
not rewritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

# metadata written by running/viewing a notebook, not by authoring it
NOTEBOOK_META_DROP = ("widgets", "papermill", "execution")
CELL_META_DROP = ("execution", "ExecuteTime", "papermill", "collapsed", "scrolled", "widgets")


def strip(nb: nbformat.NotebookNode) -> list[str]:
    """Strip ``nb`` in place; return what was removed (empty when already clean)."""
    removed: set[str] = set()
    for key in NOTEBOOK_META_DROP:
        if nb.metadata.pop(key, None) is not None:
            removed.add(f"metadata.{key}")
    for cell in nb.cells:
        if cell.cell_type == "code":
            if cell.get("outputs"):
                removed.add("outputs")
            cell.outputs = []
            if cell.get("execution_count") is not None:
                removed.add("execution_count")
            cell.execution_count = None
        for key in CELL_META_DROP:
            if cell.metadata.pop(key, None) is not None:
                removed.add(f"cell.metadata.{key}")
    return sorted(removed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    ap.add_argument(
        "--check", action="store_true", help="only report; exit 1 if any notebook needs stripping"
    )
    args = ap.parse_args(argv)

    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        removed = strip(nb)
        if not removed:
            continue
        dirty.append(path)
        if args.check:
            print(f"{path}: has {', '.join(removed)}")
        else:
            nbformat.write(nb, path)
            print(f"stripped {path} ({', '.join(removed)})")

    if args.check:
        if dirty:
            print(f"{len(dirty)} notebook(s) need stripping: run `make strip`", file=sys.stderr)
            return 1
        print(f"{len(paths)} notebook(s) clean")
    elif not dirty:
        print(f"{len(paths)} notebook(s) already clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
