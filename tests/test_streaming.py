"""Streaming datasets: same rows as the source, seeded per-draw transforms, reshuffled passes, exact resume,
clear errors, and the same losses as map-style training for the same order."""

from __future__ import annotations

import json
import random
from itertools import islice

import pytest
from datasets import Dataset, IterableDataset

from sftkit.errors import SftkitError
from sftkit.paths import TINY_MODEL_DIR, WORLD_DIR
from sftkit.streaming import streaming_dataset

ROWS = [{"id": i, "text": f"row {i}"} for i in range(7)]


def tag(example: dict, rng: random.Random) -> dict:
    return {**example, "draw": rng.randrange(10**6)}


def test_one_pass_yields_the_source_in_order():
    stream = streaming_dataset(ROWS)
    assert isinstance(stream, IterableDataset)
    assert list(stream) == ROWS
    assert list(stream) == ROWS  # iterable again: the Trainer starts a new pass this way
    assert list(streaming_dataset(Dataset.from_list(ROWS))) == ROWS


def test_transform_runs_at_every_draw_and_is_seeded():
    stream = list(islice(streaming_dataset(ROWS, tag, infinite=True, seed=1), 21))
    assert [r["id"] for r in stream] == [r["id"] for r in ROWS] * 3
    draws_of_row0 = [r["draw"] for r in stream if r["id"] == 0]
    assert len(set(draws_of_row0)) == 3  # a fresh variant each time the row is drawn
    again = list(islice(streaming_dataset(ROWS, tag, infinite=True, seed=1), 21))
    other = list(islice(streaming_dataset(ROWS, tag, infinite=True, seed=2), 21))
    assert stream == again and stream != other


def test_shuffle_gives_each_pass_a_new_order_of_all_rows():
    stream = list(islice(streaming_dataset(ROWS, infinite=True, shuffle=True, seed=3), 21))
    passes = [[r["id"] for r in stream[i : i + 7]] for i in (0, 7, 14)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_resume_from_datasets_state_continues_exactly():
    stream = streaming_dataset(ROWS, tag, infinite=True, shuffle=True, seed=5)
    it = iter(stream)
    list(islice(it, 10))
    state = stream.state_dict()
    following = list(islice(it, 6))
    resumed = streaming_dataset(ROWS, tag, infinite=True, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    assert list(islice(resumed, 6)) == following


def test_bad_sources_and_transforms_are_refused():
    with pytest.raises(SftkitError, match="one-shot iterator"):
        streaming_dataset(r for r in ROWS)
    with pytest.raises(SftkitError, match="must return a dict"):
        streaming_dataset(ROWS, lambda ex, rng: ex["text"])
    with pytest.raises(SftkitError, match="iterable of examples"):
        streaming_dataset("data.jsonl")
    with pytest.raises(SftkitError, match="callable"):
        streaming_dataset(ROWS, transform="shuffle")


def _train_losses(train_dataset, steps: int, tmp_path) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        seed=0,
        train_sampling_strategy="sequential",
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_streaming_and_map_style_training_give_the_same_losses(tmp_path):
    rows = [json.loads(line) for line in islice((WORLD_DIR / "chat_train.jsonl").open(), 24)]
    rows = [{"messages": r["messages"]} for r in rows]
    mapped = _train_losses(Dataset.from_list(rows), 5, tmp_path / "map")
    streamed = _train_losses(streaming_dataset(rows, infinite=True), 5, tmp_path / "stream")
    assert len(mapped) == len(streamed) == 5
    assert max(abs(a - b) for a, b in zip(mapped, streamed)) < 1e-4, (mapped, streamed)
    assert mapped[-1] < mapped[0]  # it trained
