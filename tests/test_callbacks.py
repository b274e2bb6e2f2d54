"""GenerationSamplesCallback: a W&B table per evaluation, read back from the offline run, and local JSONL/HTML."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sftkit.callbacks import COLUMNS, GenerationSamplesCallback
from sftkit.errors import SftkitError
from sftkit.tracking import offline_runs, read_history, read_tables, setup_wandb

QUESTIONS = ["what is the capital of france ?", "what color is the sun ?", "where is <rome> & paris ?"]
ANSWERS = ["paris", "yellow", "italy"]


def _rows(n: int = 3) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in list(zip(QUESTIONS, ANSWERS))[:n]
    ]


@pytest.fixture
def model_and_tokenizer(tiny_model_dir_with_pad):
    from sftkit.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir_with_pad, dtype="fp32")


def _event(callback, event: str, tmp_path, step: int, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    state = TrainerState()
    state.global_step = step
    getattr(callback, event)(args, state, TrainerControl(), **kwargs)


def test_rows_and_local_files(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    cb = GenerationSamplesCallback.from_rows(_rows(), n=3, max_new_tokens=4)
    _event(cb, "on_train_begin", tmp_path, 0, model=model, processing_class=tok)
    _event(cb, "on_evaluate", tmp_path, 5, model=model, processing_class=tok, metrics={})
    _event(cb, "on_evaluate", tmp_path, 5, model=model, processing_class=tok, metrics={})  # 2nd eval set
    assert cb.output_dir == tmp_path / "run" / "samples"  # defaults under args.output_dir
    assert [r["step"] for r in cb.rows] == [0, 0, 0, 5, 5, 5]
    assert [r["prompt"] for r in cb.rows[:3]] == QUESTIONS and [
        r["reference"] for r in cb.rows[3:]
    ] == ANSWERS
    assert all(isinstance(r["generation"], str) for r in cb.rows)
    assert cb.rows[0]["generation_settings"] == {"decoding": "greedy", "max_new_tokens": 4}

    lines = [json.loads(x) for x in cb.jsonl_path.read_text().splitlines()]
    assert lines == cb.rows
    page = cb.html_path.read_text()
    assert "<th>step 0</th><th>step 5</th>" in page
    assert "&lt;rome&gt; &amp; paris" in page and "<rome>" not in page  # prompts are escaped
    assert not list(cb.output_dir.glob(".*tmp*"))  # no temporary files left behind


def test_greedy_samples_repeat_exactly(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    cb = GenerationSamplesCallback(QUESTIONS[:2], output_dir=tmp_path, max_new_tokens=5)
    for step in (1, 2):
        _event(cb, "on_evaluate", tmp_path, step, model=model, processing_class=tok, metrics={})
    first, second = cb.rows[:2], cb.rows[2:]
    assert [r["generation"] for r in first] == [r["generation"] for r in second]  # same weights, greedy
    assert all(r["reference"] == "" for r in cb.rows)


def test_needs_processing_class(tmp_path, model_and_tokenizer):
    model, _ = model_and_tokenizer
    cb = GenerationSamplesCallback(QUESTIONS[:1], output_dir=tmp_path)
    with pytest.raises(SftkitError, match="processing_class"):
        # transformers 4 passed tokenizer=; 5 passes processing_class= only.
        _event(cb, "on_evaluate", tmp_path, 1, model=model, tokenizer=object(), metrics={})


def test_bad_arguments():
    with pytest.raises(SftkitError, match="no prompts"):
        GenerationSamplesCallback([])
    with pytest.raises(SftkitError, match="references"):
        GenerationSamplesCallback(["a", "b"], ["x"])
    with pytest.raises(SftkitError, match="at least 1"):
        GenerationSamplesCallback(["a"], max_new_tokens=0)
    with pytest.raises(SftkitError, match="assistant"):
        GenerationSamplesCallback.from_rows([{"messages": [{"role": "user", "content": "hi"}] * 2}])


class _KwargsSpy(TrainerCallback):
    def __init__(self):
        self.keys: list[set] = []

    def on_evaluate(self, args, state, control, **kwargs):
        self.keys.append(set(kwargs))


def test_sft_run_logs_a_table_per_evaluation(tmp_path, monkeypatch, tiny_model_dir_with_pad):
    """A real SFTTrainer run with report_to="wandb" (offline): the table and the local files agree."""
    import wandb
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sftkit.loading import load_model_and_tokenizer

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline
    info = setup_wandb(tmp_path, project="sftkit-tests", tags="callback")
    model, tok = load_model_and_tokenizer(tiny_model_dir_with_pad, dtype="fp32")
    data = Dataset.from_list(_rows() * 8)
    samples = GenerationSamplesCallback.from_rows(_rows(), max_new_tokens=4, output_dir=tmp_path / "samples")
    spy = _KwargsSpy()
    args = SFTConfig(
        output_dir=str(tmp_path / "ckpt"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, logging_steps=1, save_strategy="no",
        report_to="wandb", run_name="cb-test", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)), processing_class=tok,
        callbacks=[samples, spy],
    )  # fmt: skip
    trainer.train()
    wandb.finish()

    # transformers 5 hands callbacks the tokenizer as processing_class, and no longer as tokenizer.
    assert spy.keys and all("processing_class" in k and "tokenizer" not in k for k in spy.keys)

    (run,) = offline_runs(info.runs_dir)
    tables = read_tables(run, "samples")
    assert [t["history"]["train/global_step"] for t in tables] == [0, 2, 4]
    assert all(t["columns"] == list(COLUMNS) for t in tables)
    assert [len(t["data"]) for t in tables] == [3, 6, 9]  # each table holds every row so far
    last = tables[-1]["data"]
    assert [row[0] for row in last] == [0] * 3 + [2] * 3 + [4] * 3
    assert [row[1] for row in last[-3:]] == QUESTIONS and [row[3] for row in last[-3:]] == ANSWERS
    assert json.loads(last[0][4]) == {"decoding": "greedy", "max_new_tokens": 4}
    # The same files on disk, without sftkit's reader.
    files = sorted((run / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(files) == 3 and max(len(json.loads(f.read_text())["data"]) for f in files) == 9
    # The eval loss was logged by WandbCallback at the same steps the tables were.
    assert [r["train/global_step"] for r in read_history(run) if "eval/loss" in r] == [2, 4]

    local = [json.loads(x) for x in samples.jsonl_path.read_text().splitlines()]
    assert [
        [r[c] if c != "generation_settings" else json.dumps(r[c]) for c in COLUMNS] for r in local
    ] == last
    assert "<th>step 4</th>" in samples.html_path.read_text()
