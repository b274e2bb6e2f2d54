"""load_model_and_tokenizer on a real tiny checkpoint, and every input error it reports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from fixtures_tiny import build_model, build_tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from sftkit import loading
from sftkit.errors import SftkitError
from sftkit.loading import load_model_and_tokenizer


def _load_quietly(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model_and_tokenizer(path, **kwargs)


def test_loads_real_objects_and_sets_pad_to_eos_with_warning(tiny_model_dir: Path) -> None:
    with pytest.warns(UserWarning, match="no pad token.*EOS"):
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32  # "auto" on CPU
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_str_path_works_like_pathlike(tiny_model_dir: Path) -> None:
    model, tokenizer = _load_quietly(str(tiny_model_dir))
    assert tokenizer.pad_token == "</s>" and isinstance(model, LlamaForCausalLM)


def test_existing_pad_token_is_kept_without_warning(tiny_model_dir_with_pad: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir_with_pad)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_choices(tiny_model_dir: Path, dtype, expected: torch.dtype) -> None:
    model, _ = _load_quietly(tiny_model_dir, dtype=dtype)
    assert model.dtype == expected


def test_auto_dtype_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loading._resolve_dtype("auto") == torch.float32  # this CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loading._resolve_dtype("auto") == torch.bfloat16
    # fp16-only GPUs (T4) load fp32 master weights: fp16 weights break the grad scaler.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loading._resolve_dtype("auto") == torch.float32


@pytest.mark.parametrize("dtype", ["int8", "fp8", 16])
def test_bad_dtype_is_rejected_before_loading(tiny_model_dir: Path, dtype) -> None:
    with pytest.raises(SftkitError) as info:
        load_model_and_tokenizer(tiny_model_dir, dtype=dtype)
    assert "fp32" in info.value.fix


def test_torch_dtype_kwarg_points_to_dtype(tiny_model_dir: Path) -> None:
    with pytest.raises(SftkitError, match="torch_dtype") as info:
        load_model_and_tokenizer(tiny_model_dir, torch_dtype=torch.float32)
    assert "dtype=" in info.value.fix


@pytest.mark.parametrize(
    "name",
    ["./no-such-model", "/definitely/not/here", "~/no-such-sftkit-model", "data/models/nope", "../nope"],
)
def test_missing_local_path(name: str) -> None:
    with pytest.raises(SftkitError) as info:
        load_model_and_tokenizer(name)
    assert name in info.value.problem and "does not exist" in info.value.problem
    assert "TINY_MODEL_DIR" in info.value.fix and "Qwen/Qwen2.5-0.5B" in info.value.fix


def test_missing_pathlike_is_local_even_without_slashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftkitError, match="does not exist"):
        load_model_and_tokenizer(Path("model"))


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_empty_or_invalid_name(name) -> None:
    with pytest.raises(SftkitError, match="Empty or invalid"):
        load_model_and_tokenizer(name)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(SftkitError, match="is a file") as info:
        load_model_and_tokenizer(file)
    assert "config.json" in info.value.fix


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SftkitError, match="no config.json") as info:
        load_model_and_tokenizer(tmp_path)
    assert "save_pretrained" in info.value.fix


def test_lora_adapter_folder_suggests_peft(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "Qwen/Qwen2.5-0.5B"})
    )
    with pytest.raises(SftkitError, match="no config.json") as info:
        load_model_and_tokenizer(tmp_path)
    assert "PeftModel.from_pretrained" in info.value.fix and "Qwen/Qwen2.5-0.5B" in info.value.fix


def test_training_output_folder_suggests_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "config.json").write_text("{}")
    with pytest.raises(SftkitError) as info:
        load_model_and_tokenizer(tmp_path)
    assert "checkpoint-10" in info.value.fix


def test_uncached_hub_id_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; patch the constant it actually uses.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SftkitError) as info:
        load_model_and_tokenizer("sftkit-tests/definitely-not-cached-model")
    assert (
        "offline" in info.value.problem and "sftkit-tests/definitely-not-cached-model" in info.value.problem
    )
    assert "HF_HUB_OFFLINE" in info.value.fix and "local" in info.value.fix
    assert isinstance(info.value.__cause__, OSError)


def test_trust_remote_code_is_passed_explicitly(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    _load_quietly(tiny_model_dir)
    assert seen[-1]["trust_remote_code"] is False
    assert seen[-1]["dtype"] == torch.float32
    assert "device_map" not in seen[-1] and "quantization_config" not in seen[-1]


def test_tokenizer_without_pad_or_eos_is_an_error() -> None:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(SftkitError, match="neither a pad token nor an EOS") as info:
        loading._ensure_pad_token(model, tokenizer)
    assert "add_special_tokens" in info.value.fix
