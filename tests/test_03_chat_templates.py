"""Notebook 03 on another seed: the generation-prompt and end-of-turn claims hold beyond seed 42."""

from __future__ import annotations

from nbrun import run_notebook


def test_chat_templates_on_another_seed(tmp_path):
    m = run_notebook("03_chat_templates.ipynb", tmp_path, seed=1)
    em = m["exact_match"]
    assert em["with_generation_prompt"] >= 0.6 and em["without_generation_prompt"] <= 0.3, em
    stop = m["stop_rate"]
    assert stop["end token trained"] >= 0.9, stop
    assert stop["end token not trained"] <= stop["end token trained"] - 0.4, stop
    assert stop["trained, but generation stops on <|endoftext|> only"] <= 0.5, stop
    errors = m["errors"]
    assert "not training-compatible" in errors["unmarked_template"]
    assert "not conversational" in errors["sharegpt_assistant_only_loss"]
    assert len(errors["conversations"]) == 5
    assert m["clone"]["after"]["tokenizer EOS"] == "<|im_end|>"
