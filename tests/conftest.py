"""Test-session setup: offline, deterministic environment; ``tests/`` importable (``from nbrun import ...``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Set before anything imports transformers/datasets/wandb; kernels started by papermill inherit them.
# Offline is forced, not defaulted: a test that needs the network fails here instead of passing on a laptop
# with HF_HUB_OFFLINE=0 (tests/test_run_validation.py::test_the_test_session_is_offline checks it).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
}.items():
    os.environ[_key] = _value
for _key, _value in {
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
    "JUPYTER_PREFER_ENV_PATH": "1",  # the venv's python3 kernelspec wins over a user-level one
}.items():
    os.environ.setdefault(_key, _value)

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# Shared fixtures (tiny random model folders) live in a plain module; register it as a plugin.
if (TESTS_DIR / "fixtures_tiny.py").exists():
    pytest_plugins = ["fixtures_tiny"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that calls ``run_notebook`` executes a notebook: mark it ``slow`` even if its author forgot."""
    for item in items:
        fn = getattr(item, "function", None)
        code = getattr(fn, "__code__", None)
        if code is not None and "run_notebook" in code.co_names:
            item.add_marker(pytest.mark.slow)
