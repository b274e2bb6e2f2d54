"""python -m sftkit merge: the happy path with a trained adapter, refusals, and no half-written output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from fixtures_tiny import build_tokenizer
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from sftkit import merge
from sftkit.__main__ import main as cli_main
from sftkit.errors import SftkitError
from sftkit.paths import REPO_ROOT, TINY_MODEL_DIR, WORLD_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sftkit", *args],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _probe(tokenizer):
    return tokenizer(
        ["Where does Nobo Orrwood live?", "What does Petha keep as a pet?"], return_tensors="pt", padding=True
    )


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter really trained (6 SFT steps) on the tiny base, saved with tokenizer and training_info."""
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    rows = [json.loads(line) for line in (WORLD_DIR / "chat_train.jsonl").read_text().splitlines()[:48]]
    args = SFTConfig(
        output_dir=str(out.parent / "ckpt"),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        assistant_only_loss=True,
        max_length=128,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        bf16=False,
        fp16=False,
        use_cpu=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / merge.TRAINING_INFO).write_text(
        json.dumps(
            {
                "data": {"train": "data/world/chat_train.jsonl (48 rows)"},
                "hyperparameters": {"max_steps": 6, "learning_rate": 1e-2, "lora_r": 8},
                "metrics": {"train_loss": round(trainer.state.log_history[-1]["train_loss"], 3)},
            }
        )
    )
    return out


def _random_adapter(base: Path, out: Path, **lora) -> Path:
    """A real PEFT adapter with random (non-zero) B matrices, so merging changes the weights."""
    model = AutoModelForCausalLM.from_pretrained(base)
    lora.setdefault("target_modules", "all-linear")  # saved expanded to the names of this model's modules
    peft_model = get_peft_model(
        model, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    )
    peft_model.save_pretrained(out)
    return out


def _llama_dir(path: Path, *, hidden: int = 32, layers: int = 2, tie: bool = False) -> Path:
    """A tiny random Llama (word-level tokenizer) with the given shape, saved to ``path``."""
    tokenizer = build_tokenizer(with_pad=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_happy_path_with_a_trained_adapter(trained_adapter, tmp_path):
    out = tmp_path / "merged"
    proc = _cli("merge", "--base", str(TINY_MODEL_DIR), "--adapter", str(trained_adapter), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["reload_max_abs_logit_diff"] == 0.0
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
    } <= names
    assert not any(n.startswith("adapter_") for n in names)
    card = (out / "README.md").read_text()
    for needle in ("base_model:", "data/world/chat_train.jsonl", "learning_rate", "train_loss", "lora_alpha"):
        assert needle in card, needle
    # Plain transformers reloads it; its logits equal base + adapter's within fp32 rounding.
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and reloaded.generation_config.eos_token_id == [0, 5]
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    with_adapter = PeftModel.from_pretrained(base, trained_adapter).eval()
    inputs = _probe(tokenizer)
    with torch.inference_mode():
        expected = with_adapter(**inputs).logits
        got = reloaded(**inputs).logits
        base_logits = with_adapter.get_base_model()
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    # ...and the adapter did change the model (a no-op merge would pass the check above trivially).
    with torch.inference_mode(), with_adapter.disable_adapter():
        plain = with_adapter(**inputs).logits
    assert (plain - expected).abs().max() > 1e-2
    assert base_logits is not None


def test_refuses_a_base_with_another_hidden_size(tmp_path):
    adapter = _random_adapter(_llama_dir(tmp_path / "a", hidden=32), tmp_path / "adapter")
    other = _llama_dir(tmp_path / "b", hidden=64)
    out = tmp_path / "merged"
    proc = _cli("merge", "--base", str(other), "--adapter", str(adapter), "--out", str(out))
    assert proc.returncode == 2
    assert (
        "does not fit this base model" in proc.stderr and "hidden 64" in proc.stderr and "fix:" in proc.stderr
    )
    assert not out.exists()


def test_refuses_a_shallower_or_deeper_base(tmp_path):
    adapter = _random_adapter(_llama_dir(tmp_path / "two", layers=2), tmp_path / "adapter")
    with pytest.raises(SftkitError, match="the base has no such module"):
        merge.merge_to_folder(str(_llama_dir(tmp_path / "one", layers=1)), adapter, tmp_path / "o1")
    # Every tensor fits the first two layers of a 3-layer model; adapter_config.json's recorded base tells.
    with pytest.raises(SftkitError, match="num_hidden_layers=2, this base has 3"):
        merge.merge_to_folder(str(_llama_dir(tmp_path / "three", layers=3)), adapter, tmp_path / "o3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_refuses_a_deeper_base_when_the_recorded_base_is_gone(tmp_path):
    """Short target names ("q_proj") that match modules the adapter holds no weights for: another model."""
    adapter = _random_adapter(
        _llama_dir(tmp_path / "two", layers=2), tmp_path / "adapter", target_modules=["q_proj", "v_proj"]
    )
    shutil.rmtree(tmp_path / "two")
    with pytest.raises(SftkitError, match="2 module.s. of the base match the adapter's target_modules"):
        merge.merge_to_folder(str(_llama_dir(tmp_path / "three", layers=3)), adapter, tmp_path / "o3")


def test_refuses_non_lora_and_non_adapter_folders(tmp_path):
    base = _llama_dir(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "prompt"
    )
    with pytest.raises(SftkitError, match="PROMPT_TUNING adapter"):
        merge.merge_to_folder(str(base), tmp_path / "prompt", tmp_path / "o")
    with pytest.raises(SftkitError, match="already a full model"):
        merge.merge_to_folder(str(base), base, tmp_path / "o")
    with pytest.raises(SftkitError, match="does not exist"):
        merge.merge_to_folder(str(base), tmp_path / "missing", tmp_path / "o")


def test_refuses_a_quantized_base(tmp_path):
    base = _llama_dir(tmp_path / "base")
    adapter = _random_adapter(base, tmp_path / "adapter")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(SftkitError, match="saved quantized"):
        merge.merge_to_folder(str(base), adapter, tmp_path / "o")


def test_refuses_outputs_that_would_destroy_inputs(tmp_path):
    base = _llama_dir(tmp_path / "base")
    adapter = _random_adapter(base, tmp_path / "adapter")
    with pytest.raises(SftkitError, match="overlaps the adapter"):
        merge.merge_to_folder(str(base), adapter, adapter)
    with pytest.raises(SftkitError, match="overlaps the base model"):
        merge.merge_to_folder(str(base), adapter, base / "merged")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    with pytest.raises(SftkitError, match="--overwrite"):
        merge.merge_to_folder(str(base), adapter, existing)
    merge.merge_to_folder(str(base), adapter, existing, overwrite=True)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_exception_mid_save_leaves_nothing(tmp_path, monkeypatch):
    base = _llama_dir(tmp_path / "base")
    adapter = _random_adapter(base, tmp_path / "adapter")
    seen = {}

    def explode(path, text):  # called after the weights and tokenizer are written
        seen["files"] = sorted(p.name for p in Path(path).iterdir())
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(merge, "write_model_card", explode)
    out = tmp_path / "out" / "merged"
    with pytest.raises(OSError, match="disk full"):
        merge.merge_to_folder(str(base), adapter, out)
    assert "model.safetensors" in seen["files"]  # the failure really came mid-save
    assert not out.exists() and _leftovers(out) == []

    # A failed --overwrite keeps the previous model intact.
    out.mkdir()
    (out / "model.safetensors").write_text("previous model")
    with pytest.raises(OSError):
        merge.merge_to_folder(str(base), adapter, out, overwrite=True)
    assert (out / "model.safetensors").read_text() == "previous model" and _leftovers(out) == []


def test_killed_mid_save_leaves_no_output_folder(tmp_path):
    base = _llama_dir(tmp_path / "base")
    adapter = _random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    # A real SIGKILL of a real merge process, at a known point: after the weights are written.
    code = (
        "import os, signal, sys\n"
        "from sftkit import merge\n"
        "merge.write_model_card = lambda path, text: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from sftkit.__main__ import main\n"
        f"sys.exit(main(['merge', '--base', {str(base)!r}, '--adapter', {str(adapter)!r}, '--out', {str(out)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    (partial,) = _leftovers(out)  # the half-written folder is a hidden sibling, never at --out
    assert (tmp_path / partial / "model.safetensors").is_file()


def test_tied_embeddings_trained_separately_are_untied_on_save(tmp_path):
    """modules_to_save copies of a tied embedding and lm_head: the merged model must keep both.

    PEFT 0.21 sets tie_word_embeddings=False when it merges them; were it not to, saving would keep one matrix
    and the merge command's reload check would refuse to write the folder.
    """
    base = _llama_dir(tmp_path / "base", tie=True)
    adapter = _random_adapter(base, tmp_path / "adapter", modules_to_save=["embed_tokens", "lm_head"])
    # Make the two trained copies differ, as training would.
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[key] = weights[key] + 0.5 * torch.randn_like(weights[key])
    save_file(weights, adapter / "adapter_model.safetensors")

    merge.merge_to_folder(str(base), adapter, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    inputs = tokenizer(["the king of rome"], return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(reloaded(**inputs).logits, ref(**inputs).logits, atol=1e-5)


def test_adapter_with_new_tokens_resizes_the_base(tmp_path):
    base = _llama_dir(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool>", "</tool>"])
    model.resize_token_embeddings(len(tokenizer))
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            init_lora_weights=False,
            target_modules="all-linear",
            modules_to_save=["embed_tokens", "lm_head"],
            task_type="CAUSAL_LM",
        ),
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    # Without the tokenizer the extra rows are unexplained: refused.
    with pytest.raises(SftkitError, match="no tokenizer that explains"):
        merge.merge_to_folder(str(base), adapter, tmp_path / "o")
    tokenizer.save_pretrained(adapter)
    summary = merge.merge_to_folder(str(base), adapter, tmp_path / "merged")
    assert "resized" in summary["notes"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tokenizer)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    assert (
        cli_main(
            [
                "merge",
                "--base",
                str(tmp_path / "nope"),
                "--adapter",
                str(tmp_path / "a"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_bf16_merge_keeps_dtype(tmp_path):
    base = _llama_dir(tmp_path / "base")
    adapter = _random_adapter(base, tmp_path / "adapter")
    summary = merge.merge_to_folder(str(base), adapter, tmp_path / "m", dtype="bf16")
    assert summary["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.bfloat16
    shutil.rmtree(tmp_path / "m")
