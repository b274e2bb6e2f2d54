"""docs/validation.md cannot drift: every quoted message fragment is in sftkit's source, every test exists
and checks that row's message."""

from __future__ import annotations

import ast
import re
from difflib import SequenceMatcher
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "validation.md"
SOURCE = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "sftkit").glob("*.py")))
MIN_OVERLAP = 7  # characters a test's expected string must share with the row's message


def rows() -> list[dict]:
    """The table rows of docs/validation.md: bad input, message and fix fragments, test id."""
    out = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 4 or cells[0] in ("Bad input", "---"):
            continue
        out.append(
            {
                "input": cells[0],
                "message": re.findall(r"`([^`]+)`", cells[1]),
                "fix": re.findall(r"`([^`]+)`", cells[2]),
                "test": cells[3],
            }
        )
    return out


ROWS = rows()


def _test_function(test_id: str) -> ast.FunctionDef:
    path, _, name = test_id.partition("::")
    file = REPO / path
    assert file.is_file(), f"{path} does not exist"
    tree = ast.parse(file.read_text(encoding="utf-8"))
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name.split("[")[0]]
    assert found, f"{test_id}: no such test function"
    return found[0]


def _strings(node: ast.AST) -> list[str]:
    """String constants in a test, regex escapes undone (pytest.raises(match=...) patterns)."""
    texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return [re.sub(r"\\(.)", r"\1", t) for t in texts]


def test_the_doc_has_rows_for_every_kind_of_check():
    assert len(ROWS) >= 40, len(ROWS)
    tests = {r["test"] for r in ROWS}
    for needed in ("test_qlora_without_bitsandbytes", "test_fp16_on_cpu", "test_bf16_on_a_gpu_without_bf16",
                   "test_padding_free_with_a_custom_collator", "test_stream_without_max_steps",
                   "test_wrong_base_goes_through_the_validation_layer", "test_output_dir_with_an_unrecorded_run",
                   "test_output_dir_same_run_resumes_and_a_different_run_is_refused",
                   "test_remote_code_is_refused_unless_trusted", "test_pickle_model_folder",
                   "test_pickle_adapter_is_refused_by_merge", "test_missing_columns"):  # fmt: skip
        assert any(t.endswith("::" + needed) for t in tests), needed


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['test'].split('::')[-1]}-{i}" for i, r in enumerate(ROWS)])
def test_row_matches_the_code_and_its_test(row):
    assert row["message"] and row["fix"], f"{row['input']}: quote the message and the fix in `code`"
    for fragment in row["message"] + row["fix"]:
        assert fragment in SOURCE, f"{row['input']}: {fragment!r} is not in sftkit's source (message changed?)"
    func = _test_function(row["test"])
    expected = [s for s in _strings(func) if len(s) >= MIN_OVERLAP]
    best = max(
        (
            SequenceMatcher(None, s, f, autojunk=False).find_longest_match(0, len(s), 0, len(f)).size
            for s in expected
            for f in row["message"] + row["fix"]
        ),
        default=0,
    )
    assert best >= MIN_OVERLAP, f"{row['test']} does not check this row's message ({row['message']})"


def test_readme_links_the_doc():
    assert "docs/validation.md" in (REPO / "README.md").read_text(encoding="utf-8")
