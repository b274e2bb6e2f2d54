"""Run a lesson notebook headless, the way ``make demo`` does, and return the metrics it wrote.

from nbrun import run_notebook

@pytest.mark.slow
def test_quickstart(tmp_path):
    metrics = run_notebook("00_quickstart.ipynb", tmp_path, max_steps=5)
    assert metrics["eval_loss"] < 10
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_TIMEOUT_S = 900  # per cell, same as `make test`'s nbmake run


def run_notebook(name: str, tmp_path: Path | str, **params: Any) -> dict:
    """Execute ``notebooks/<name>`` with papermill and return ``<output_dir>/metrics.json``.

    The kernel is ``python3`` (the interpreter running the tests) with ``notebooks/`` as its working
    directory, exactly as in Jupyter. ``params`` are injected after the ``parameters`` cell;
    ``output_dir`` defaults to ``str(tmp_path)``. The executed copy is saved as ``tmp_path/<name>``
    so a failure can be inspected.
    """
    import papermill as pm  # imported lazily: collection must not pay for it

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = NOTEBOOKS_DIR / name
    assert src.is_file(), f"no such notebook: {src}"
    params.setdefault("output_dir", str(tmp_path))
    executed = tmp_path / name
    for key, value in {"PYTHONHASHSEED": "0", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)

    pm.execute_notebook(
        str(src),
        str(executed),
        parameters=params,
        kernel_name="python3",
        cwd=str(NOTEBOOKS_DIR),
        progress_bar=False,
        execution_timeout=DEFAULT_TIMEOUT_S,
    )

    metrics_path = Path(params["output_dir"]) / "metrics.json"
    if not metrics_path.is_absolute():  # relative output_dir is resolved by the kernel, in notebooks/
        metrics_path = NOTEBOOKS_DIR / metrics_path
    if not metrics_path.is_file():
        raise AssertionError(
            f"{name} ran but wrote no {metrics_path} (output_dir={params['output_dir']!r}); "
            f"executed notebook: {executed}"
        )
    with metrics_path.open() as f:
        return json.load(f)
