"""Notebook 02 on another seed and a smaller timing set: the claims are not an accident of seed 42."""

from __future__ import annotations

from pathlib import Path

from nbrun import run_notebook


def test_dataset_modes_on_another_seed(tmp_path):
    # nbmake runs the defaults (seed 42, 50,000 timing rows); here seed 1 and 10,000 rows.
    m = run_notebook("02_dataset_modes.ipynb", tmp_path, seed=1, n_timing_rows=10_000)
    masks = m["masks"]
    assert masks["formatting_func_equals_text"] and masks["pretokenized_labels_kept"]
    assert masks["pretokenized_equals_prompt_completion"]
    assert masks["trained_share"]["text"] == 1.0 and masks["trained_share"]["prompt/completion"] < 0.2
    timing = m["timing"]
    assert timing["rows"] == 10_000 and min(timing["cache_speedup"].values()) >= 10, timing
    assert (Path(tmp_path) / "datasets_cache").is_dir()  # the cache lives under output_dir
    eos = m["eos"]
    assert eos["stop_rate"]["with EOS"] >= 0.8, eos
    assert eos["stop_rate"]["without EOS"] <= eos["stop_rate"]["with EOS"] - 0.4, eos
    assert eos["mean_new_tokens"]["without EOS"] > 2 * eos["mean_new_tokens"]["with EOS"], eos
    assert set(m["validation_errors"]) == {
        "misnamed column",
        "a DatasetDict, no split",
        "non-string values",
        "empty response",
        "longer than max_length",
    }
    for error in ("formatting_func_list", "dataset_text_field", "DataCollatorForCompletionOnlyLM"):
        assert m["old_api_errors"][error] != "no error"
