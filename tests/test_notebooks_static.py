"""Static checks on every lesson notebook (nothing is executed): fast, run on every `make test`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
README = REPO_ROOT / "README.md"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))

NAME_RE = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
# Anything that would block a headless run waiting for a human.
INTERACTIVE_RE = re.compile(
    r"notebook_login\(|wandb\.login\(|(?<![\w.])login\(|(?<![\w.])input\(|getpass"
    r"|\b(?:huggingface-cli|hf)\s+(?:auth\s+)?login\b"
)
README_NB_RE = re.compile(r"\d\d_[a-z0-9_]+\.ipynb")


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def test_notebooks_folder_exists():
    assert NOTEBOOKS_DIR.is_dir(), f"missing {NOTEBOOKS_DIR}"


needs_notebooks = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


@needs_notebooks
def test_valid_json_and_nbformat(path: Path):
    json.loads(path.read_text(encoding="utf-8"))
    nbformat.validate(_read(path))


@needs_notebooks
def test_filename_convention(path: Path):
    assert NAME_RE.match(path.name), f"{path.name} does not match {NAME_RE.pattern}"


@needs_notebooks
def test_no_outputs(path: Path):
    dirty = [
        i
        for i, cell in enumerate(_code_cells(_read(path)))
        if cell.get("outputs") or cell.get("execution_count") is not None
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs/execution_count; run `make strip`"


@needs_notebooks
def test_parameters_cell_is_first_code_cell(path: Path):
    nb = _read(path)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, (
        f"{path.name}: expected exactly one cell tagged 'parameters', found {len(tagged)}"
    )
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    assert tagged[0] == first_code, f"{path.name}: the 'parameters' cell must be the first code cell"


@needs_notebooks
def test_kernel_is_python3(path: Path):
    # papermill/nbmake (and Colab) start `python3`; a custom kernelspec name would not resolve elsewhere.
    kernelspec = _read(path).metadata.get("kernelspec")
    if kernelspec is not None:
        assert kernelspec.get("name") == "python3", f"{path.name}: kernelspec name {kernelspec.get('name')!r}"


@needs_notebooks
def test_no_interactive_calls(path: Path):
    hits = []
    for i, cell in enumerate(_code_cells(_read(path))):
        for line in cell.source.splitlines():
            if line.lstrip().startswith("#"):
                continue
            if INTERACTIVE_RE.search(line):
                hits.append(f"code cell {i}: {line.strip()}")
    assert not hits, f"{path.name} would block a headless run:\n" + "\n".join(hits)


@needs_notebooks
def test_listed_in_readme(path: Path):
    assert README.is_file(), "README.md is missing"
    assert path.name in README.read_text(encoding="utf-8"), f"{path.name} is not mentioned in README.md"


def test_readme_table_notebooks_exist():
    if not README.is_file():
        pytest.skip("no README.md yet")
    listed = {
        name
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.lstrip().startswith("|")
        for name in README_NB_RE.findall(line)
    }
    missing = sorted(name for name in listed if not (NOTEBOOKS_DIR / name).is_file())
    assert not missing, f"README.md's table lists notebooks that do not exist: {missing}"
