"""The quickstart proves its claim: held-out exact match rises from near zero after LoRA SFT."""

from __future__ import annotations

from pathlib import Path

from nbrun import run_notebook


def test_quickstart_learns_on_another_seed(tmp_path):
    # nbmake runs the defaults (seed 42); here a different seed must give the same story.
    m = run_notebook("00_quickstart.ipynb", tmp_path, seed=1)
    assert m["before"]["n"] == m["after"]["n"] == 200
    assert m["before"]["exact_match"] <= 0.05, m["before"]
    assert m["after"]["exact_match"] >= 0.80, m["after"]
    # The base model knows some answers but rambles; SFT teaches it to answer and stop.
    assert m["after"]["exact_match"] - m["before"]["exact_match"] >= 0.7
    train = m["train"]
    assert train["device"] == "cpu" and train["train_tokens"] > 10_000 and train["tokens_per_s"] > 0
    assert train["peak_memory_gb"] > 0
    adapter = Path(tmp_path) / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()


def test_quickstart_refuses_a_missing_model_before_training(tmp_path):
    import papermill as pm
    import pytest

    with pytest.raises(pm.PapermillExecutionError, match="does not exist"):
        run_notebook("00_quickstart.ipynb", tmp_path, model_name="../data/no-such-model")
    assert not (Path(tmp_path) / "metrics.json").exists()
