"""Pack documents into fixed-length blocks: lazily (a resumable ``ConstantLengthDataset``) or eagerly.

``trl.trainer.ConstantLengthDataset`` was removed in trl 0.20; ``SFTConfig(packing=True)`` replaced it for
map-style data. :class:`ConstantLengthPacker` keeps what it did for streams and infinite data: it formats,
tokenizes and packs examples *as they are drawn*, with EOS between documents, optionally forever and shuffled
through a buffer. Unlike the old class it never throws tokens away except at the very end of a finite stream,
it records where each document starts (``seq_lengths``) so TRL's padding-free collator can keep documents
apart, and it can be saved mid-stream and resumed exactly (:meth:`ConstantLengthPacker.state_dict`).

:func:`pack_eager` is the reference it is checked against (same blocks, built at once with numpy), and
:func:`packed_logit_gap` measures whether documents in a packed row see each other.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, islice
from typing import Any

import numpy as np
import torch

from sftkit.errors import SftkitError
from sftkit.validation import check_reiterable

_STATE_VERSION = 1


def _with_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """Append EOS unless the document already ends with it (some chat templates end with EOS)."""
    if eos_token_id is None or (ids and ids[-1] == eos_token_id):
        return ids
    return ids + [eos_token_id]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SftkitError(
            f"{name} must be an integer >= {minimum}, got {value!r}.", f"pass e.g. {name}=1024."
        )
    return int(value)


class ConstantLengthPacker:
    """Lazily format, tokenize and pack examples into blocks of ``block_length`` tokens.

    Each document's tokens are followed by EOS and appended to one running token stream, which is cut into
    blocks of exactly ``block_length`` tokens; a document that does not fit continues in the next block.
    Every block is ``{"input_ids": [...], "seq_lengths": [...]}`` where ``seq_lengths`` are the lengths of
    the document pieces in it (they sum to ``block_length``).

    * **Nothing is dropped or repeated** within a pass, except the last ``< block_length`` tokens of a finite
      stream when ``drop_last=True`` (the default; ``drop_last=False`` yields them as one shorter block).
      An infinite packer carries that remainder into the next pass instead.
    * ``infinite=True`` starts a new pass over ``source`` when it runs out (``max_steps`` ends training).
    * ``shuffle=True`` draws blocks at random from a buffer of ``shuffle_buffer`` blocks and, for an indexable
      source (a list or ``datasets.Dataset``), visits the examples in a new random order on every pass.
      Everything random comes from ``seed``: the same seed gives the same blocks.
    * :meth:`state_dict` / :meth:`load_state_dict` save and restore the position mid-stream (a JSON-able
      dict), so an interrupted run continues with exactly the blocks it would have seen.

    Text comes from ``formatting_func(example)`` if given; else an example's ``input_ids`` are packed as they
    are; else its ``messages`` go through the chat template; else ``example[text_field]`` is read.
    ``add_special_tokens=None`` adds the tokenizer's special tokens (e.g. BOS) to plain text but not to
    chat-template text, which already contains them. EOS is appended unless a document ends with it.

    Pass :meth:`to_iterable_dataset` to ``SFTTrainer(train_dataset=...)`` together with
    ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, max_steps=...)``. With
    ``padding_free=True`` TRL's collator restarts ``position_ids`` at every ``seq_lengths`` boundary, so the
    documents in a block do not attend to each other; without it they do, as with the old class.
    """

    def __init__(
        self,
        source: Iterable[Mapping[str, Any]],
        tokenizer,
        *,
        block_length: int = 1024,
        formatting_func: Callable[[Mapping[str, Any]], str] | None = None,
        text_field: str = "text",
        add_eos: bool = True,
        add_special_tokens: bool | None = None,
        infinite: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 64,
        seed: int = 0,
        drop_last: bool = True,
        tokenize_batch_size: int = 64,
    ) -> None:
        self.block_length = _positive_int("block_length", block_length, minimum=2)
        self.shuffle_buffer = _positive_int("shuffle_buffer", shuffle_buffer)
        self.tokenize_batch_size = _positive_int("tokenize_batch_size", tokenize_batch_size)
        check_reiterable(
            source,
            "it can be read only once, so the packer could neither start a second pass nor resume.",
            "pass something that can be iterated again: a list, a datasets.Dataset, or "
            "datasets.IterableDataset.from_generator(your_generator_function).",
        )
        self.eos_token_id = tokenizer.eos_token_id if add_eos else None
        if add_eos and self.eos_token_id is None:
            raise SftkitError(
                "add_eos=True but the tokenizer has no EOS token, so documents could not be separated.",
                "set tokenizer.eos_token (e.g. tokenizer.eos_token = '</s>'), or pass add_eos=False.",
            )
        self.source = source
        self.tokenizer = tokenizer
        self.formatting_func = formatting_func
        self.text_field = text_field
        self.add_special_tokens = add_special_tokens
        self.infinite = bool(infinite)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self._indexable = hasattr(source, "__len__") and hasattr(source, "__getitem__")
        self._resume: dict | None = None
        self._live: dict | None = None
        # Format the first example now: a wrong field name should fail here, not after the model has loaded.
        first = next(iter(source), None)
        if first is None:
            raise SftkitError("source has no examples.", "check the file or split you loaded.")
        self._format(first)

    # ----------------------------------------------------------------------------------------- formatting
    def _format(self, example: Mapping[str, Any]) -> tuple[str | list[int], str]:
        """Return (text or token ids, kind) for one example; kind is "text", "chat" or "ids"."""
        if self.formatting_func is not None:
            text, kind = self.formatting_func(example), "text"
        elif isinstance(example, Mapping) and "input_ids" in example:
            return [int(t) for t in example["input_ids"]], "ids"
        elif isinstance(example, Mapping) and "messages" in example:
            text, kind = self.tokenizer.apply_chat_template(example["messages"], tokenize=False), "chat"
        elif isinstance(example, Mapping) and self.text_field in example:
            text, kind = example[self.text_field], "text"
        else:
            keys = list(example) if isinstance(example, Mapping) else type(example).__name__
            raise SftkitError(
                f"cannot find text in an example with keys {keys}: it has no {self.text_field!r} field, no "
                "'messages' list and no 'input_ids'.",
                "pass text_field='<your column>', or formatting_func=lambda ex: <a string built from ex>.",
            )
        if not isinstance(text, str):
            raise SftkitError(
                f"formatting produced a {type(text).__name__}, not a string.",
                "make formatting_func return one string per example (trl >= 0.17 calls it per example too).",
            )
        return text, kind

    def encode(self, example: Mapping[str, Any]) -> list[int]:
        """Token ids of one example as the packer adds them to the stream (EOS included)."""
        return self._encode_batch([example])[0]

    def _encode_batch(self, examples: list[Mapping[str, Any]]) -> list[list[int]]:
        formatted = [self._format(ex) for ex in examples]
        out: list[list[int] | None] = [None] * len(examples)
        for i, (value, kind) in enumerate(formatted):
            if kind == "ids":  # already tokenized: packed as it is
                out[i] = _with_eos(value, self.eos_token_id)
        # One fast-tokenizer call per kind of text (chat text must not get special tokens added twice).
        for kind in ("text", "chat"):
            idx = [i for i, (_, k) in enumerate(formatted) if k == kind]
            if not idx:
                continue
            special = (kind == "text") if self.add_special_tokens is None else self.add_special_tokens
            ids = self.tokenizer([formatted[i][0] for i in idx], add_special_tokens=special)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = _with_eos(list(row), self.eos_token_id)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------- iteration
    def _fresh_state(self) -> dict:
        return {
            "epoch": 0,
            "position": 0,
            "tokens": [],
            "pieces": [],
            "buffer": [],
            "blocks": 0,
            "dropped": 0,
        }

    def _epoch_examples(self, epoch: int, position: int) -> Iterator[Mapping[str, Any]]:
        """Examples of pass ``epoch`` from index ``position`` on, in that pass's order."""
        if self._indexable:
            order = list(range(len(self.source)))
            if self.shuffle:
                random.Random(f"{self.seed}-pass-{epoch}").shuffle(order)
            return (self.source[i] for i in order[position:])
        if hasattr(self.source, "set_epoch"):  # a shuffled datasets.IterableDataset reshuffles per epoch
            self.source.set_epoch(epoch)
        return islice(iter(self.source), position, None)

    def _cut_block(self, state: dict, length: int) -> dict:
        """Remove the first ``length`` tokens of the stream as one block, splitting a document if needed."""
        tokens, pieces = state["tokens"], state["pieces"]
        block_ids = tokens[:length]
        del tokens[:length]
        seq_lengths, need = [], length
        while need:
            if pieces[0] <= need:
                need -= pieces[0]
                seq_lengths.append(pieces.pop(0))
            else:
                pieces[0] -= need
                seq_lengths.append(need)
                need = 0
        return {"input_ids": block_ids, "seq_lengths": seq_lengths}

    def _emit_full_blocks(self, state: dict, rng: random.Random) -> Iterator[dict]:
        while len(state["tokens"]) >= self.block_length:
            block = self._cut_block(state, self.block_length)
            if self.shuffle:
                buffer = state["buffer"]
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(block)
                    continue
                i = rng.randrange(len(buffer))
                block, buffer[i] = buffer[i], block
            state["blocks"] += 1
            yield block

    def _generate(self, state: dict, rng: random.Random) -> Iterator[dict]:
        # Blocks already complete in a restored state come first, exactly as they would have.
        yield from self._emit_full_blocks(state, rng)
        while True:
            examples = self._epoch_examples(state["epoch"], state["position"])
            read = state["position"]
            while batch := list(islice(examples, self.tokenize_batch_size)):
                docs = self._encode_batch(batch)
                state["position"] += len(batch)
                read += len(batch)
                for ids in docs:
                    if ids:
                        state["tokens"].extend(ids)
                        state["pieces"].append(len(ids))
                yield from self._emit_full_blocks(state, rng)
            if read == 0:
                raise SftkitError(
                    f"pass {state['epoch']} over the source produced no examples.",
                    "check that the source is not empty and yields the same examples each time it is iterated.",
                )
            if not self.infinite:
                break
            state["epoch"] += 1
            state["position"] = 0
        # End of a finite stream: the remainder, then whatever the shuffle buffer still holds.
        if state["tokens"]:
            if self.drop_last:
                state["dropped"] += len(state["tokens"])
                state["tokens"].clear()
                state["pieces"].clear()
            else:
                state["buffer"].append(self._cut_block(state, len(state["tokens"])))
        buffer = state["buffer"]
        rng.shuffle(buffer)
        while buffer:
            state["blocks"] += 1
            yield buffer.pop()
        if state["blocks"] == 0:
            raise SftkitError(
                f"the source holds {state['dropped']} tokens, fewer than one block of {self.block_length}, so "
                "no block was produced (the Trainer would train on nothing).",
                "lower block_length, pass drop_last=False, or pass infinite=True to cycle through the data.",
            )

    def __iter__(self) -> Iterator[dict]:
        """Iterate blocks from the start, or from the state given to load_state_dict (once)."""
        if self._resume is not None:
            saved, self._resume = self._resume, None
            state = {k: copy.deepcopy(v) for k, v in saved.items() if k not in ("rng", "version", "config")}
            rng = random.Random()
            version, internal, gauss = saved["rng"]
            rng.setstate((version, tuple(internal), gauss))
        else:
            state, rng = self._fresh_state(), random.Random(f"{self.seed}-blocks")
        self._live = {"state": state, "rng": rng}
        return self._generate(state, rng)

    # ------------------------------------------------------------------------------------- resumable state
    def _config(self) -> dict:
        return {
            "block_length": self.block_length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "infinite": self.infinite,
            "add_eos": self.eos_token_id is not None,
        }

    def state_dict(self) -> dict:
        """JSON-able position of the most recently started iteration (after the last block it yielded)."""
        if self._live is None:
            state, rng = self._fresh_state(), random.Random(f"{self.seed}-blocks")
        else:
            state, rng = self._live["state"], self._live["rng"]
        version, internal, gauss = rng.getstate()
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            **copy.deepcopy(state),
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration continue exactly where ``state`` (from state_dict) left off."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise SftkitError(
                "this is not a packer state (missing or unknown 'version').",
                "pass the dict returned by ConstantLengthPacker.state_dict().",
            )
        if state["config"] != self._config():
            raise SftkitError(
                f"the saved state was made by a packer configured as {state['config']}, this one is "
                f"{self._config()}; resuming would give different blocks.",
                "create the packer with the same block_length, seed, shuffle, shuffle_buffer, infinite and "
                "add_eos as the run that saved the state.",
            )
        self._resume = copy.deepcopy(dict(state))

    # ----------------------------------------------------------------------------------------- for trainers
    def to_iterable_dataset(self):
        """A ``datasets.IterableDataset`` of the blocks, usable directly as ``SFTTrainer(train_dataset=...)``."""
        from datasets import Features, IterableDataset, List, Value

        features = Features({"input_ids": List(Value("int32")), "seq_lengths": List(Value("int32"))})
        return IterableDataset.from_generator(_iterate, features=features, gen_kwargs={"packer": self})


def _iterate(packer: ConstantLengthPacker) -> Iterator[dict]:
    """Generator function for IterableDataset.from_generator (a module-level function pickles cleanly)."""
    yield from packer


def pack_eager(
    token_ids: Iterable[Sequence[int]],
    block_length: int,
    eos_token_id: int | None = None,
    drop_last: bool = True,
) -> list[dict]:
    """Reference packer: concatenate all documents (+EOS) at once and cut the stream into equal blocks."""
    block_length = _positive_int("block_length", block_length, minimum=2)
    docs = [d for d in (_with_eos(list(ids), eos_token_id) for ids in token_ids) if d]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    total = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=total)
    ends = np.cumsum(lengths)  # stream offsets where documents end
    n_blocks = total // block_length if drop_last else -(-total // block_length)
    blocks = []
    for b in range(n_blocks):
        start, stop = b * block_length, min((b + 1) * block_length, total)
        inner = ends[np.searchsorted(ends, start, side="right") : np.searchsorted(ends, stop, side="left")]
        cuts = np.concatenate(([start], inner, [stop]))
        blocks.append({"input_ids": flat[start:stop].tolist(), "seq_lengths": np.diff(cuts).tolist()})
    return blocks


def padding_fraction(lengths: Sequence[int], batch_size: int, *, seed: int = 0) -> float:
    """Share of padding when ``lengths`` are batched in random order and padded to each batch's longest."""
    batch_size = _positive_int("batch_size", batch_size)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = slots = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        real += sum(batch)
        slots += max(batch) * len(batch)
    return 1 - real / slots if slots else 0.0


def batch_tokens(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(real tokens, token slots) of a collated batch; padding is what the attention mask leaves out."""
    slots = int(batch["input_ids"].numel())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), slots
    # Padding-free batches have no mask: every token is real unless pad_to_multiple_of padded the row.
    if "cu_seq_lens_q" in batch:
        return int(batch["cu_seq_lens_q"][-1]), slots
    return slots, slots


@torch.no_grad()
def packed_logit_gap(
    model, input_ids: Sequence[int], seq_lengths: Sequence[int], *, restart_positions: bool = True
) -> float:
    """Largest |logit| difference between each document of a packed row and that document run alone.

    With ``restart_positions`` the row gets ``position_ids`` restarting at 0 for every document and no
    attention mask, as TRL's padding-free collator sends it; transformers then builds a block-diagonal mask
    (``masking_utils.find_packed_sequence_indices``). Without, the row is one long causal sequence, as
    ``packing_strategy="wrapped"`` or the old ConstantLengthDataset produced. ``use_cache=False`` matters:
    with a KV cache transformers skips the packed-sequence detection.
    """
    ids = torch.as_tensor(list(input_ids), device=model.device)[None]
    lengths = [int(n) for n in seq_lengths]
    if sum(lengths) != ids.shape[1] or min(lengths) < 1:
        raise SftkitError(
            f"seq_lengths {lengths} do not add up to the row's {ids.shape[1]} tokens.",
            "pass the block's own seq_lengths (each document's length, summing to len(input_ids)).",
        )
    kwargs: dict[str, Any] = {"use_cache": False}
    if restart_positions:
        kwargs["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).to(model.device)[None]
    was_training = model.training
    model.eval()  # dropout would make the two runs differ for reasons unrelated to packing
    try:
        packed = model(input_ids=ids, **kwargs).logits[0].float()
        gap, start = 0.0, 0
        for n in lengths:
            alone = model(input_ids=ids[:, start : start + n], use_cache=False).logits[0].float()
            gap = max(gap, (packed[start : start + n] - alone).abs().max().item())
            start += n
    finally:
        model.train(was_training)
    return gap


def measure_throughput(
    model, arms: Mapping[str, Sequence[Mapping[str, Any]]], *, warmup: int = 1, cpu_threads: int | None = None
) -> dict:
    """Time one forward+backward per batch for each arm, interleaving arms so load drift hits all alike.

    ``arms`` maps a name to collated batches (e.g. from ``trainer.get_train_dataloader()``); round ``r``
    runs batch ``r`` of every arm in turn. Returns per arm the median seconds per step, real tokens and
    slots per step, the padding fraction and the median real (non-padding) tokens per second. The first
    ``warmup`` rounds are not counted. ``cpu_threads`` sets torch's CPU threads while timing (on a machine
    shared with other work, 1 thread gives far steadier ratios than several that wait on each other).
    """
    rounds = min(len(batches) for batches in arms.values())
    if rounds <= warmup:
        raise SftkitError(
            f"each arm needs more than warmup={warmup} batches; the shortest has {rounds}.",
            "pass more batches per arm (e.g. 6) or a smaller warmup.",
        )
    was_training, threads = model.training, torch.get_num_threads()
    if cpu_threads is not None:
        torch.set_num_threads(_positive_int("cpu_threads", cpu_threads))
    model.train()
    samples: dict[str, list[tuple[int, int, float]]] = {name: [] for name in arms}
    try:
        for r in range(rounds):
            for name, batches in arms.items():
                batch = batches[r]
                real, slots = batch_tokens(batch)
                # Everything the collator made goes in, as the Trainer does (sdpa/eager ignore cu_seq_lens_*).
                inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loss = model(**inputs, use_cache=False).loss
                loss.backward()
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                if r >= warmup:
                    samples[name].append((real, slots, seconds))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_num_threads(threads)
    results = {}
    for name, rows in samples.items():
        real = sum(r for r, _, _ in rows)
        slots = sum(s for _, s, _ in rows)
        results[name] = {
            "steps": len(rows),
            "step_seconds": statistics.median(t for _, _, t in rows),
            "real_tokens_per_step": real / len(rows),
            "slots_per_step": slots / len(rows),
            "padding_fraction": 1 - real / slots,
            "tokens_per_s": statistics.median(r / t for r, _, t in rows),
        }
    return results
