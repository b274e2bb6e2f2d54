"""RunTimer and training_summary, including the token count of a real (tiny) SFTTrainer run."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset

from sftkit.device import choose_precision
from sftkit.loading import load_model_and_tokenizer
from sftkit.summary import RunTimer, count_train_tokens, read_peak_memory_gb, training_summary

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "what is the capital of france ?"},
            {"role": "assistant", "content": "paris"},
        ]
    },
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]},
] * 4


def test_run_timer_measures_time_and_memory() -> None:
    with RunTimer() as timer:
        time.sleep(0.05)
    assert timer.seconds >= 0.05
    assert timer.device in {"cpu", "cuda", "mps"}
    if os.name == "posix":
        assert timer.peak_memory_gb is not None and 0 < timer.peak_memory_gb < 1024
    assert timer.as_dict()["seconds"] == timer.seconds


def test_run_timer_records_even_when_the_block_fails() -> None:
    timer = RunTimer()
    with pytest.raises(RuntimeError):
        with timer:
            raise RuntimeError("boom")
    assert timer.seconds is not None


def test_training_summary_from_a_real_sft_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        args = SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=2,
            logging_steps=2,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            gradient_checkpointing=False,
            **choose_precision().trainer_kwargs(),
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer
        )
        with RunTimer() as timer:
            trainer.train()

    summary = training_summary(trainer, timer.seconds, timer.peak_memory_gb)
    assert set(summary) == {"seconds", "train_tokens", "tokens_per_s", "peak_memory_gb", "device"}
    logged = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    assert logged, "trl should log the running token count as 'num_tokens'"
    assert summary["train_tokens"] == trainer._total_train_tokens == int(logged[-1]) > 0
    assert summary["tokens_per_s"] > 0
    assert summary["device"] == model.device.type


def test_count_tokens_falls_back_to_log_history() -> None:
    state = SimpleNamespace(
        log_history=[{"num_tokens": 10.0}, {"num_tokens": 25.0, "loss": 1.0}, {"train_runtime": 1}]
    )
    assert count_train_tokens(SimpleNamespace(state=state)) == 25


def test_count_tokens_falls_back_to_dataset() -> None:
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]})
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[], epoch=2.0), train_dataset=dataset)
    assert count_train_tokens(trainer) == 10
    assert count_train_tokens(SimpleNamespace(state=SimpleNamespace(log_history=[]))) is None


def test_training_summary_without_token_count() -> None:
    summary = training_summary(
        SimpleNamespace(state=SimpleNamespace(log_history=[])), 2.0, peak_memory_gb=1.234
    )
    assert summary["train_tokens"] is None and summary["tokens_per_s"] is None
    assert summary["peak_memory_gb"] == 1.23 and summary["seconds"] == 2.0


def test_read_peak_memory_gb() -> None:
    value = read_peak_memory_gb()
    assert value is None or value > 0
