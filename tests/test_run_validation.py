"""sftkit.validation's run-level checks: options, hardware, streams, output folders, model and adapter folders.

Every bad input raises SftkitError(problem, fix) before training; docs/validation.md lists them with these tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, IterableDataset
from fixtures_tiny import save_tiny
from trl import SFTConfig

from sftkit import validation
from sftkit.errors import SftkitError
from sftkit.loading import load_model_and_tokenizer
from sftkit.paths import REPO_ROOT, TINY_MODEL_DIR
from sftkit.validation import (
    RUN_FILE,
    check_adapter_folder,
    check_model_folder,
    check_options,
    check_output_dir,
    record_run,
    run_fingerprint,
    validate_run,
)

ROWS = [{"text": "the capital of france is paris ."}, {"text": "the capital of italy is rome ."}]


def config(tmp_path: Path, **kwargs) -> SFTConfig:
    kwargs.setdefault("output_dir", str(tmp_path / "run"))
    kwargs.setdefault("max_steps", 2)
    return SFTConfig(report_to="none", bf16=False, use_cpu=True, **kwargs)


def hardware(**kwargs) -> SimpleNamespace:
    """Just the precision fields (an SFTConfig with fp16=True cannot even be built on a CPU-only machine)."""
    return SimpleNamespace(**{"bf16": False, "fp16": False, "use_cpu": False, **kwargs})


def refused(match: str, func, *args, **kwargs) -> SftkitError:
    with pytest.raises(SftkitError, match=match) as info:
        func(*args, **kwargs)
    assert info.value.fix  # every refusal says how to fix it
    return info.value


# --- incompatible options ------------------------------------------------------------------------------------


def test_qlora_without_bitsandbytes(tmp_path, monkeypatch):
    args = config(tmp_path)
    check_options(args, use_peft=True, load_in_4bit=True)  # bitsandbytes is installed here: accepted
    monkeypatch.setattr(validation, "_bitsandbytes_available", lambda: False)
    err = refused("bitsandbytes is not installed", check_options, args, use_peft=True, load_in_4bit=True)
    assert "pip install bitsandbytes" in err.fix
    refused("load_in_8bit=True", check_options, args, use_peft=True, load_in_8bit=True)
    check_options(args, use_peft=True)  # no quantization asked for: bitsandbytes is not needed


def test_qlora_without_bitsandbytes_fails_the_recipe(monkeypatch):
    from sftkit.recipe import parse_args, validate

    monkeypatch.chdir(REPO_ROOT)
    recipe, model_args, args = parse_args(["--config", "configs/recipes/tiny_lora.yaml", "--load_in_4bit", "true"])
    monkeypatch.setattr(validation, "_bitsandbytes_available", lambda: False)
    refused("bitsandbytes is not installed", validate, recipe, model_args, args)


def test_fp16_on_cpu():
    refused('precision="fp16" was requested but this machine has no GPU', check_options, hardware(fp16=True),
            device="cpu")  # fmt: skip
    refused("no GPU", check_options, hardware(fp16=True, use_cpu=True))  # use_cpu=True means the CPU


def test_bf16_on_cpu():
    refused('precision="bf16" was requested but this machine has no GPU', check_options, hardware(bf16=True),
            device="cpu")  # fmt: skip


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int], bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_bf16_on_a_gpu_without_bf16(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5), bf16=False)
    err = refused("Tesla T4 does not support bfloat16", check_options, hardware(bf16=True), device="cuda")
    assert "fp16" in err.fix
    check_options(hardware(fp16=True), device="cuda")  # a T4 does fp16


def test_fp16_on_a_gpu_without_fp16(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla K80", (3, 7), bf16=False)
    refused("has no half-precision arithmetic", check_options, hardware(fp16=True), device="cuda")
    check_options(hardware(), device="cuda")  # fp32 is fine anywhere


def test_bf16_and_fp16_together():
    refused("both bf16=True and fp16=True", check_options, hardware(bf16=True, fp16=True), device="cuda")


@pytest.mark.parametrize("options", [{"packing": True}, {"padding_free": True}], ids=["bfd-packing", "padding-free"])
def test_padding_free_with_a_custom_collator(tmp_path, options):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    args = config(tmp_path, **options)
    err = refused("custom data_collator", check_options, args, data_collator=collator)
    assert "position_ids" in err.problem
    check_options(args)  # TRL's own collator: fine
    check_options(config(tmp_path, packing=True, packing_strategy="wrapped"), data_collator=collator)


def test_stream_without_max_steps(tmp_path):
    def rows():
        yield from ROWS

    stream = IterableDataset.from_generator(rows)
    refused("but max_steps is not set", check_options, config(tmp_path, max_steps=-1), train_dataset=stream)
    check_options(config(tmp_path, max_steps=10), train_dataset=stream)
    check_options(config(tmp_path, max_steps=-1), train_dataset=Dataset.from_list(ROWS))  # has a length


def test_hub_token_in_the_config(tmp_path):
    err = refused("hub_token is set", check_options, config(tmp_path, hub_token="hf_FAKEFAKEFAKE"))
    assert "HF_TOKEN" in err.fix and "hf_FAKE" not in str(err)


# --- the output folder -------------------------------------------------------------------------------------


def test_output_dir_same_run_resumes_and_a_different_run_is_refused(tmp_path):
    args = config(tmp_path, learning_rate=1e-3)
    first = validate_run(args, model="data/tiny-base", data_id={"train": "abc"}, record=True)
    assert not first.resumes and (Path(args.output_dir) / RUN_FILE).is_file()
    # Same model, data and config (max_steps and logging may change): a resume is allowed.
    again = config(tmp_path, learning_rate=1e-3, max_steps=50, logging_steps=3)
    assert validate_run(again, model="data/tiny-base", data_id={"train": "abc"}).resumes

    err = refused("already holds a different run", validate_run, config(tmp_path, learning_rate=5e-4),
                  model="data/tiny-base", data_id={"train": "abc"})  # fmt: skip
    assert "learning_rate: 0.001 -> 0.0005" in err.problem
    assert "new output_dir" in err.fix and "--overwrite" in err.fix
    refused("model: 'data/tiny-base' -> 'other'", validate_run, args, model="other", data_id={"train": "abc"})
    refused("data.train: 'abc' -> 'xyz'", validate_run, args, model="data/tiny-base", data_id={"train": "xyz"})
    # overwrite_output_dir accepts it
    assert not validate_run(
        config(tmp_path, learning_rate=5e-4), model="data/tiny-base", data_id={"train": "abc"},
        overwrite_output_dir=True,
    ).resumes  # fmt: skip


@pytest.mark.parametrize("marker", ["checkpoint-10", "trainer_state.json", "final", "model.safetensors"])
def test_output_dir_with_an_unrecorded_run(tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).mkdir() if "." not in marker else (out / marker).write_text("{}")
    fp = run_fingerprint(config(tmp_path), model="m")
    refused(f"already holds another run \\({marker}\\)", check_output_dir, out, fp)
    assert check_output_dir(out, fp, overwrite=True) is False
    (out / marker).rename(out / "notes.txt")  # unrelated files do not make it a run
    assert check_output_dir(out, fp) is False


def test_fingerprint_never_holds_tokens(tmp_path):
    fp = run_fingerprint(config(tmp_path, hub_token="hf_FAKEFAKE"), model="m")
    record = record_run(tmp_path / "out", fp)
    assert "hf_FAKE" not in record.read_text() and "hub_token" not in fp["config"]


def test_validate_run_checks_the_data_too(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    check = validate_run(config(tmp_path), model=str(TINY_MODEL_DIR), train_dataset=Dataset.from_list(ROWS),
                         tokenizer=tok)  # fmt: skip
    assert check.report is not None and check.report.n_rows == 2
    assert check.fingerprint["data"]["dataset_fingerprint"]
    refused("not a string", validate_run, config(tmp_path), model="m", tokenizer=tok,
            train_dataset=Dataset.from_list([{"text": "a"}, {"text": None}]))  # fmt: skip


def test_chat_template_path_is_the_template_checked(tmp_path):
    """validate_run checks the template SFTTrainer will use: SFTConfig.chat_template_path, not the tokenizer's."""
    from transformers import AutoTokenizer

    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "Where does Ada live?"},
                                            {"role": "assistant", "content": "Oakridge"}]}])  # fmt: skip
    marked = AutoTokenizer.from_pretrained(TINY_MODEL_DIR).chat_template
    unmarked = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    unmarked.chat_template = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    jinja = tmp_path / "marked.jinja"
    jinja.write_text(marked, encoding="utf-8")
    refused("needs \\{% generation %\\}", validate_run, config(tmp_path, assistant_only_loss=True), model="m",
            train_dataset=chat, tokenizer=unmarked)  # fmt: skip
    # the fix the refusal suggests (a marked .jinja through chat_template_path) is accepted
    check = validate_run(config(tmp_path, assistant_only_loss=True, chat_template_path=str(jinja)), model="m",
                         train_dataset=chat, tokenizer=unmarked)  # fmt: skip
    assert check.report.n_rows == 1 and "{% generation %}" not in unmarked.chat_template  # caller's copy untouched
    # a base model without a template, given one by cloning a tokenizer folder (trl.clone_chat_template)
    bare = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    bare.chat_template = None
    refused("no chat template", validate_run, config(tmp_path), model="m", train_dataset=chat, tokenizer=bare)
    source = tmp_path / "source_tokenizer"
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(source)
    assert validate_run(config(tmp_path, chat_template_path=str(source)), model="m", train_dataset=chat,
                        tokenizer=bare).report.shape == "conversational"  # fmt: skip
    refused("is neither a .jinja/.j2 file nor a tokenizer that can be loaded", validate_run,
            config(tmp_path, chat_template_path=str(tmp_path / "missing")), model="m", train_dataset=chat,
            tokenizer=bare)  # fmt: skip


# --- the train command refuses a different run in its output_dir -------------------------------------------


def test_recipe_refuses_a_different_run_in_output_dir(tmp_path, monkeypatch):
    from sftkit.recipe import load_data, parse_args, validate_recipe_run

    monkeypatch.chdir(REPO_ROOT)
    base = ["--config", "configs/recipes/tiny_lora.yaml", "--output_dir", str(tmp_path / "run"),
            "--max_train_samples", "16", "--validation_file", "", "--assistant_only_loss", "false"]  # fmt: skip
    recipe, model_args, args = parse_args(base)
    train, _, _ = load_data(recipe, args)
    check = validate_recipe_run(recipe, model_args, args, train)
    record_run(args.output_dir, check.fingerprint)
    assert validate_recipe_run(recipe, model_args, args, train).resumes

    recipe, model_args, args = parse_args(base + ["--lora_r", "8"])
    refused("peft.lora_r: 16 -> 8", validate_recipe_run, recipe, model_args, args, train)
    recipe, model_args, args = parse_args(base + ["--lora_r", "8", "--overwrite"])
    assert not validate_recipe_run(recipe, model_args, args, train).resumes


# --- model and adapter folders: custom code and pickles -------------------------------------------------------


@pytest.fixture
def remote_code_dir(tmp_path) -> Path:
    folder = save_tiny(tmp_path / "custom")
    config_file = folder / "config.json"
    cfg = json.loads(config_file.read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}
    config_file.write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    return folder


def test_remote_code_is_refused_unless_trusted(remote_code_dir):
    err = refused("ships its own Python code", load_model_and_tokenizer, remote_code_dir)
    assert "modeling_evil" in err.problem and "trust_remote_code=True" in err.fix
    check_model_folder(remote_code_dir, trust_remote_code=True)  # the opt-in passes the check


def test_remote_code_is_refused_by_the_recipe(remote_code_dir, tmp_path, monkeypatch):
    from sftkit.recipe import parse_args, validate

    monkeypatch.chdir(REPO_ROOT)
    argv = ["--config", "configs/recipes/tiny_lora.yaml", "--model_name_or_path", str(remote_code_dir)]
    refused("ships its own Python code", validate, *parse_args(argv))
    validate(*parse_args(argv + ["--trust_remote_code", "true"]))


def test_pickle_model_folder(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    err = refused("holds its weights only as pickle", load_model_and_tokenizer, folder)
    assert "allow_pickle=True" in err.fix
    with pytest.warns(UserWarning, match="no pad token"):
        model, _ = load_model_and_tokenizer(folder, allow_pickle=True)  # the opt-in loads it
    assert model.config.hidden_size == 32


def test_loading_asks_for_safetensors(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    with pytest.warns(UserWarning):
        load_model_and_tokenizer(tiny_model_dir)
    assert seen[-1]["use_safetensors"] is True and seen[-1]["trust_remote_code"] is False


def _adapter(base: Path, out: Path, *, pickle: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out, safe_serialization=not pickle)
    return out


def test_pickle_adapter_is_refused_by_merge(tmp_path, tiny_model_dir):
    from sftkit.merge import merge_to_folder

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", pickle=True)
    assert (adapter / "adapter_model.bin").is_file()
    err = refused("saved as a pickle", check_adapter_folder, adapter)
    assert "--allow-pickle" in err.fix
    refused("saved as a pickle", merge_to_folder, str(tiny_model_dir), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    merge_to_folder(str(tiny_model_dir), adapter, tmp_path / "merged", allow_pickle=True)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_wrong_base_goes_through_the_validation_layer(tmp_path, tiny_model_dir, monkeypatch):
    from sftkit import merge

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", pickle=False)
    other = save_tiny(tmp_path / "other")  # same vocabulary
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 48
    (other / "config.json").write_text(json.dumps(cfg))
    calls = []
    real = validation.validate_merge
    monkeypatch.setattr(validation, "validate_merge", lambda *a, **k: calls.append(a) or real(*a, **k))
    refused("the adapter does not fit this base model", merge.merge_to_folder, str(other), adapter, tmp_path / "m")
    assert calls, "merge did not route its base/adapter check through sftkit.validation.validate_merge"


# --- the test session itself is offline -----------------------------------------------------------------------


def test_the_test_session_is_offline():
    from huggingface_hub import constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("HF_DATASETS_OFFLINE") == "1"
    assert os.environ.get("TRANSFORMERS_OFFLINE") == "1" and os.environ.get("WANDB_MODE") == "offline"
    assert constants.HF_HUB_OFFLINE is True  # read at import: conftest set it before huggingface_hub loaded
