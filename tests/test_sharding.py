"""Memory arithmetic per GPU: reproduces the ZeRO paper's Figure 1 and the relations between strategies."""

from __future__ import annotations

import pytest

from sftkit.errors import SftkitError
from sftkit.sharding import STRATEGIES, model_state_gib

GB_PER_GIB = 2**30 / 1e9


@pytest.mark.parametrize(
    ("strategy", "paper_gb"),
    [("ddp", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)],
)
def test_zero_paper_figure_1(strategy, paper_gb):
    # Rajbhandari et al. 2020, Fig. 1: a 7.5B-parameter model on 64 GPUs with mixed-precision Adam (K=12)
    got = model_state_gib(7.5e9, strategy, 64)["total"] * GB_PER_GIB
    assert got == pytest.approx(paper_gb, abs=0.06)


def test_relations_between_strategies():
    n, gpus = 1.236e9, 2
    m = {s: model_state_gib(n, s, gpus) for s in STRATEGIES}
    assert m["ddp"]["total"] > m["zero1"]["total"] > m["zero2"]["total"] > m["zero3"]["total"]
    assert m["zero3"] == m["fsdp2"]
    assert m["zero3"]["total"] == pytest.approx(m["ddp"]["total"] / gpus)
    assert m["zero3_offload"]["total"] == 0 and m["zero3_offload"]["cpu_ram"] == pytest.approx(
        m["zero3"]["total"]
    )
    assert m["zero2_offload"]["total"] == pytest.approx(m["ddp"]["weights"])
    # LoRA: frozen weights cost 2 bytes each, the 1% that trains costs 16
    lora = model_state_gib(n, "ddp", gpus, trainable_fraction=0.01)
    assert lora["total"] == pytest.approx(n * (2 + 0.01 * 14) / 2**30)


def test_bad_input():
    with pytest.raises(SftkitError, match="unknown strategy"):
        model_state_gib(1e9, "zero4", 2)
    with pytest.raises(SftkitError, match="n_gpus >= 1"):
        model_state_gib(1e9, "ddp", 0)
