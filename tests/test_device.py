"""Device detection, precision choice/validation, seeding, errors and the banner."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from sftkit import __version__
from sftkit.banner import banner, print_banner
from sftkit.device import Precision, choose_precision, describe_device, detect_device
from sftkit.errors import SftkitError
from sftkit.seeding import seed_everything


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """Pretend a CUDA GPU is present; the returned setter chooses whether it supports bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def set_bf16(supported: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)

    set_bf16(True)
    return set_bf16


def test_error_message_has_problem_and_fix() -> None:
    err = SftkitError("the thing is broken", "repair the thing")
    assert isinstance(err, ValueError)
    assert str(err) == "the thing is broken\nFix: repair the thing"
    assert (err.problem, err.fix) == ("the thing is broken", "repair the thing")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.fix == err.fix


def test_detect_device_cpu_here() -> None:
    assert detect_device() in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        assert detect_device() in {"cpu", "mps"}


def test_detect_device_prefers_cuda(fake_cuda) -> None:
    assert detect_device() == "cuda"


def test_auto_on_cpu_is_fp32_with_explicit_false_flags() -> None:
    p = choose_precision("auto", device="cpu")
    assert p == Precision("fp32", torch.float32)
    assert p.trainer_kwargs() == {"bf16": False, "fp16": False}


def test_auto_on_mps_is_fp32() -> None:
    assert choose_precision(device="mps").name == "fp32"


def test_auto_on_cuda_with_bf16(fake_cuda) -> None:
    p = choose_precision("auto")
    assert (p.name, p.dtype, p.bf16, p.fp16) == ("bf16", torch.bfloat16, True, False)
    assert p.trainer_kwargs() == {"bf16": True, "fp16": False}


def test_auto_on_cuda_without_bf16_is_fp16(fake_cuda) -> None:
    fake_cuda(False)
    p = choose_precision("auto")
    assert (p.name, p.dtype) == ("fp16", torch.float16)
    assert p.trainer_kwargs() == {"bf16": False, "fp16": True}


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("bf16", "bf16"),
        ("bfloat16", "bf16"),
        ("fp16", "fp16"),
        ("float16", "fp16"),
        ("FP32", "fp32"),
        ("float32", "fp32"),
    ],
)
def test_explicit_names_and_aliases_on_cuda(fake_cuda, requested: str, expected: str) -> None:
    assert choose_precision(requested).name == expected


@pytest.mark.parametrize("requested", ["fp32", "float32"])
def test_fp32_on_cpu_is_fine(requested: str) -> None:
    assert choose_precision(requested, device="cpu").dtype == torch.float32


@pytest.mark.parametrize("requested", ["bf16", "fp16", "bfloat16", "float16"])
def test_half_precision_on_cpu_raises(requested: str) -> None:
    with pytest.raises(SftkitError) as info:
        choose_precision(requested, device="cpu")
    assert "no GPU" in info.value.problem
    assert 'precision="auto"' in info.value.fix and '"fp32"' in info.value.fix


def test_bf16_on_old_gpu_raises(fake_cuda) -> None:
    fake_cuda(False)
    with pytest.raises(SftkitError) as info:
        choose_precision("bf16")
    assert "bfloat16" in info.value.problem
    assert "fp16" in info.value.fix
    assert choose_precision("fp16").name == "fp16"


@pytest.mark.parametrize("requested", ["int8", "", "fp8", "mixed"])
def test_unknown_precision_lists_choices(requested: str) -> None:
    with pytest.raises(SftkitError) as info:
        choose_precision(requested, device="cpu")
    for choice in ("auto", "bf16", "fp16", "fp32"):
        assert choice in info.value.fix


def test_precision_is_frozen() -> None:
    p = choose_precision(device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "bf16"  # type: ignore[misc]


def test_trainer_kwargs_build_a_cpu_sftconfig(tmp_path) -> None:
    from trl import SFTConfig

    config = SFTConfig(
        output_dir=str(tmp_path), report_to="none", **choose_precision(device="cpu").trainer_kwargs()
    )
    assert config.bf16 is False and config.fp16 is False


def test_describe_device_keys() -> None:
    info = describe_device()
    assert set(info) == {"device", "gpu_name", "gpu_memory_gb", "cpu_count", "torch_version"}
    assert info["torch_version"] == torch.__version__
    if info["device"] == "cpu":
        assert info["gpu_name"] is None and info["gpu_memory_gb"] is None


def test_seed_everything_repeats_random_draws() -> None:
    seed_everything(123)
    first = torch.rand(3)
    seed_everything(123)
    assert torch.equal(first, torch.rand(3))


def test_seed_everything_deterministic_mode() -> None:
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_banner_lists_stack_and_device(capsys: pytest.CaptureFixture[str]) -> None:
    text = banner()
    for name in ("python", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        assert name in text
    assert f"sftkit {__version__}" in text
    assert f"precision: {choose_precision().name}" in text
    if detect_device() == "cpu":
        assert "CPU," in text and "cores" in text
    print_banner()
    assert capsys.readouterr().out.strip() == text
