"""Load training and evaluation data from a local JSON/JSONL/CSV file or a hub dataset, checked before use."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sftkit.errors import SftkitError

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_split(
    source: str | os.PathLike,
    split: str = "train",
    columns: Iterable[str] = (),
    cache_dir: str | os.PathLike | None = None,
):
    """Load one split as a ``datasets.Dataset`` from a local file or a hub id, requiring ``columns``.

    ``cache_dir`` is where ``datasets`` keeps the Arrow copy, and so where later ``.map`` results are cached
    (default: ``~/.cache/huggingface/datasets``).
    """
    from datasets import load_dataset

    path = Path(source).expanduser()
    kwargs = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    if path.suffix in _LOCAL_FORMATS:
        if not path.is_file():
            raise SftkitError(
                f"data file {str(source)!r} does not exist (resolved to {path.resolve()}).",
                "check the path; relative paths are taken from the notebook's folder (notebooks/), "
                "so the shipped data is '../data/world/chat_train.jsonl'.",
            )
        # A local file loads as a single split named "train", whatever it holds.
        ds = load_dataset(_LOCAL_FORMATS[path.suffix], data_files=str(path), split="train", **kwargs)
    else:
        try:
            ds = load_dataset(str(source), split=split, **kwargs)
        except Exception as err:  # datasets raises several types for a missing or offline dataset
            raise SftkitError(
                f"could not load dataset {str(source)!r} (split {split!r}): {err}",
                "pass a local .json/.jsonl/.csv/.parquet file, or a hub dataset id on a machine that is online "
                "(HF_DATASETS_OFFLINE must not be 1).",
            ) from err
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise SftkitError(
            f"dataset {str(source)!r} lacks column(s) {missing}; it has {ds.column_names}.",
            "rename the columns (ds.rename_column) or convert the rows to the expected format first.",
        )
    if len(ds) == 0:
        raise SftkitError(f"dataset {str(source)!r} has no rows.", "check the file or split name.")
    return ds
