"""Streaming training data: a ``datasets.IterableDataset`` from any re-iterable source, transformed per draw.

``SFTTrainer`` accepts a ``datasets.IterableDataset`` (not a ``torch.utils.data.IterableDataset``) and then
needs ``max_steps``. :func:`streaming_dataset` builds one from a list, a ``datasets.Dataset`` or another
iterable, optionally endless and reshuffled on every pass, and applies ``transform(example, rng)`` each time
an example is drawn: data augmentation that costs no memory, because nothing is materialised.

The random generator handed to ``transform`` is seeded by (seed, pass, position), not by a global counter,
so a stream is reproducible, and ``IterableDataset.state_dict()`` / ``load_state_dict()`` (which resume by
replaying the generator) continue with exactly the examples the interrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import count
from typing import Any

from sftkit.errors import SftkitError
from sftkit.validation import check_reiterable

Transform = Callable[[dict, random.Random], dict]


def _check_source(source: Any) -> None:
    check_reiterable(
        source,
        "the Trainer iterates its dataset again for every pass (and SFTTrainer reads one example up front), so a "
        "generator object would be empty the second time.",
        "pass a generator *function* instead: datasets.IterableDataset.from_generator(make_rows), or a list.",
    )


def iterate_draws(
    source: Iterable[Mapping[str, Any]],
    transform: Transform | None = None,
    *,
    seed: int = 0,
    infinite: bool = False,
    shuffle: bool = False,
) -> Iterator[dict]:
    """Yield examples of ``source`` pass after pass (one pass unless ``infinite``), transformed per draw."""
    indexable = hasattr(source, "__len__") and hasattr(source, "__getitem__")
    for epoch in count() if infinite else range(1):
        if indexable:
            order = list(range(len(source)))
            if shuffle:
                random.Random(f"{seed}-order-{epoch}").shuffle(order)
            examples = (source[i] for i in order)
        else:
            if shuffle and hasattr(source, "set_epoch"):
                source.set_epoch(epoch)
            examples = iter(source)
        drawn = 0
        for position, example in enumerate(examples):
            drawn += 1
            row = dict(example)
            if transform is not None:
                row = transform(row, random.Random(f"{seed}-draw-{epoch}-{position}"))
            yield row
        if drawn == 0:
            raise SftkitError(
                f"pass {epoch} over the source yielded no examples.",
                "check that the source is not empty and can be iterated more than once.",
            )


def streaming_dataset(
    source: Iterable[Mapping[str, Any]],
    transform: Transform | None = None,
    *,
    seed: int = 0,
    infinite: bool = False,
    shuffle: bool = False,
    features=None,
):
    """A ``datasets.IterableDataset`` over ``source``; ``transform(example, rng)`` runs at every draw.

    ``infinite=True`` starts a new pass when the source runs out (``max_steps`` then ends training);
    ``shuffle=True`` visits an indexable source (list, ``datasets.Dataset``) in a new seeded order each
    pass, or calls ``set_epoch`` on a shuffled ``datasets.IterableDataset``.
    """
    from datasets import IterableDataset

    _check_source(source)
    if transform is not None and not callable(transform):
        raise SftkitError(
            f"transform must be callable, got a {type(transform).__name__}.",
            "pass a function (example: dict, rng: random.Random) -> dict.",
        )
    first = next(iter_draws := iterate_draws(source, transform, seed=seed), None)
    iter_draws.close()
    if not isinstance(first, dict):
        raise SftkitError(
            f"transform must return a dict (one example), got {type(first).__name__}.",
            "return the modified example, e.g. {**example, 'messages': new_messages}.",
        )
    # datasets reads every *list* in gen_kwargs as a list of shards to split; a tuple is passed whole.
    kwargs = {"source": tuple(source) if isinstance(source, list) else source, "transform": transform}
    kwargs.update(seed=seed, infinite=infinite, shuffle=shuffle)
    return IterableDataset.from_generator(iterate_draws, features=features, gen_kwargs=kwargs)
