"""The shipped data is exactly what the world generator produces, and its splits keep held-out people out."""

from __future__ import annotations

import json

import pytest

from sftkit import world
from sftkit.paths import WORLD_DIR


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_shipped_data_is_regenerated_byte_for_byte(tmp_path):
    counts = world.write_all(tmp_path)
    for name in counts:
        assert (tmp_path / name).read_bytes() == (WORLD_DIR / name).read_bytes(), (
            f"data/world/{name} differs from the generator: run `python -m sftkit.world write`"
        )


def test_people_are_unique_and_split_in_half():
    people = world.make_people()
    assert len({p.name for p in people}) == len(people) == world.N_PEOPLE
    assert sum(p.split == "heldout" for p in people) == world.N_PEOPLE // 2


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_sft_rows_mention_only_people_of_their_split(split):
    people = {p.name: p for p in world.make_people()}
    rows = _read(WORLD_DIR / f"alpaca_{split}.jsonl")
    assert rows and all(people[r["person"]].split == split for r in rows)
    for r in rows:
        if r["task"] == "qa":  # the reference answer is the person's fact
            assert r["output"] == getattr(people[r["person"]], r["attribute"])


def test_alpaca_rows_come_with_and_without_input():
    rows = _read(WORLD_DIR / "alpaca_train.jsonl")
    with_input = sum(bool(r["input"]) for r in rows)
    assert 0.3 < with_input / len(rows) < 0.7


def test_chat_rows_are_the_alpaca_rows_in_messages_form():
    alpaca, chat = _read(WORLD_DIR / "alpaca_heldout.jsonl"), _read(WORLD_DIR / "chat_heldout.jsonl")
    assert len(alpaca) == len(chat)
    for a, c in zip(alpaca, chat, strict=True):
        msgs = [m for m in c["messages"] if m["role"] != "system"]
        assert msgs[-1] == {"role": "assistant", "content": a["output"]}
        assert a["instruction"] in msgs[0]["content"] and a["input"] in msgs[0]["content"]


def test_every_fact_of_every_person_is_in_the_pretraining_corpus():
    # The held-out questions are answerable only if pretraining mentioned each fact next to the name.
    people = world.make_people()
    names = {p.name for p in people}
    seen: dict[str, str] = {}
    for doc in world.corpus(people, 60000, world.SEED + 7):
        words = doc.replace(".", " ").replace("?", " ").split()
        for name in {f"{a} {b}" for a, b in zip(words, words[1:])} & names:
            seen[name] = seen.get(name, "") + doc
    for p in people:
        for key in world.ATTRIBUTES:
            assert getattr(p, key) in seen[p.name], (p.name, key)
