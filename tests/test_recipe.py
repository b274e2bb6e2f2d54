"""The train command: recipe parsing, overrides, checks before training, data and tokenizer helpers, real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sftkit.errors import SftkitError
from sftkit.recipe import (
    RecipeArguments,
    add_tokens,
    data_format,
    global_batch_size,
    parse_args,
    read_extra_tokens,
    set_padding,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
TINY_LORA = REPO / "configs" / "recipes" / "tiny_lora.yaml"


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _tiny_recipe(tmp_path: Path, **changes) -> Path:
    """tiny_lora.yaml with absolute paths (so tests do not depend on the cwd) and ``changes`` applied."""
    data = yaml.safe_load(TINY_LORA.read_text())
    for key in ("model_name_or_path", "train_file", "validation_file"):
        data[key] = str(REPO / data[key])
    data["output_dir"] = str(tmp_path / "run")
    data.update(changes)
    return _write_yaml(tmp_path / "recipe.yaml", data)


# ---------------------------------------------------------------- the shipped recipes


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"tiny_lora", "tiny_corpus", "gpu_lora", "gpu_qlora", "gpu_full"} <= names, names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_and_validates(path: Path, monkeypatch):
    # Every key must be a field of RecipeArguments, trl.ModelConfig or trl.SFTConfig (TrlParser rejects others),
    # and local files must exist: the shipped recipes run from the repository root.
    monkeypatch.chdir(REPO)
    recipe, model_args, train_args = parse_args(["--config", str(path)])
    validate(recipe, model_args, train_args, num_processes=1)
    assert recipe.train_file and Path(recipe.train_file).is_file()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_knob_has_a_comment(path: Path):
    bare = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#") and ":" in line and " # " not in line
    ]
    assert not bare, f"{path.name}: keys without a trade-off comment: {bare}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_files_named_in_comments_exist(path: Path):
    import re

    named = re.findall(r"(configs/[\w/.-]+\.yaml)", path.read_text(encoding="utf-8"))
    missing = [n for n in named if not (REPO / n).is_file()]
    assert not missing, f"{path.name} mentions files that do not exist: {missing}"


# ---------------------------------------------------------------- parsing


def test_command_line_overrides_the_yaml(tmp_path):
    path = _tiny_recipe(tmp_path)
    recipe, model_args, args = parse_args(
        ["--config", str(path), "--learning_rate", "5e-4", "--per_device_train_batch_size", "4",
         "--gradient_accumulation_steps", "3", "--lora_r", "4", "--corpus_mode", "false"]
    )  # fmt: skip
    assert args.learning_rate == 5e-4 and model_args.lora_r == 4
    assert args.max_length == 256  # from the YAML, not overridden
    assert global_batch_size(args, num_processes=2) == 4 * 3 * 2
    assert global_batch_size(args) == 4 * 3  # this test runs in one process


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_defaults_fit_a_cpu(tmp_path):
    # trl's SFTConfig alone would default to bf16=True and fail on a CPU.
    _, _, args = parse_args(["--config", str(_tiny_recipe(tmp_path))])
    assert (args.bf16, args.fp16, args.use_cpu) == (False, False, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is fine on a GPU")
def test_bf16_on_cpu_is_refused_with_a_fix(tmp_path):
    recipe, model_args, args = parse_args(["--config", str(_tiny_recipe(tmp_path, bf16=True))])
    with pytest.raises(SftkitError, match="no GPU"):
        validate(recipe, model_args, args)


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(SftkitError, match="learning_rat"):
        parse_args(["--config", str(_tiny_recipe(tmp_path, learning_rat=1e-3))])


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(SftkitError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SftkitError, match="mapping"):
        parse_args(["--config", str(tmp_path / "list.yaml")])


def test_4bit_and_8bit_together_are_refused(tmp_path):
    with pytest.raises(SftkitError, match="8 bit and 4 bit"):
        parse_args(["--config", str(_tiny_recipe(tmp_path, load_in_4bit=True, load_in_8bit=True))])


# ---------------------------------------------------------------- checks before training


def _parsed(tmp_path, **changes):
    return parse_args(["--config", str(_tiny_recipe(tmp_path, **changes))])


@pytest.mark.parametrize(
    ("changes", "processes", "message"),
    [
        ({"train_file": "missing/train.jsonl"}, 1, "train_file 'missing/train.jsonl' does not exist"),
        ({"validation_file": "missing.csv"}, 1, "validation_file 'missing.csv' does not exist"),
        ({"extra_tokens_file": "missing_tokens.txt"}, 1, "extra_tokens_file"),
        ({"model_name_or_path": ""}, 1, "no model given"),
        ({"load_in_4bit": True, "use_peft": False}, 1, "cannot be fully fine-tuned"),
        ({"device_map": "auto"}, 2, "splits one model across the GPUs of ONE process"),
        ({"pad_token_id": 3, "new_pad_token": "<pad2>"}, 1, "both pad_token_id and new_pad_token"),
        ({"corpus_mode": True, "assistant_only_loss": False, "max_length": None}, 1, "needs a block size"),
        ({"corpus_mode": True}, 1, "assistant_only_loss"),
        ({"eval_strategy": "steps", "validation_file": None}, 1, "no validation_file"),
        ({"max_train_samples": 0}, 1, "max_train_samples must be at least 1"),
    ],
)
def test_validate_refuses(tmp_path, changes, processes, message):
    recipe, model_args, args = _parsed(tmp_path, **changes)
    with pytest.raises(SftkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(recipe, model_args, args, num_processes=processes)


def test_validate_accepts_device_map_in_one_process(tmp_path):
    recipe, model_args, args = _parsed(tmp_path, device_map="auto")
    validate(recipe, model_args, args, num_processes=1)


def test_quantized_with_deepspeed_is_refused(tmp_path, monkeypatch):
    recipe, model_args, args = _parsed(tmp_path, load_in_4bit=True)
    # set after parsing: SFTConfig would otherwise build a DeepSpeed plugin, which needs deepspeed installed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SftkitError, match="DeepSpeed"):
        validate(recipe, model_args, args)


# ---------------------------------------------------------------- data


def test_data_formats(tmp_path):
    from datasets import Dataset

    assert data_format(Dataset.from_dict({"text": ["a b"]})) == "text"
    assert data_format(Dataset.from_dict({"prompt": ["q"], "completion": ["a"]})) == "prompt-completion"
    assert data_format(Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])) == "messages"
    assert data_format(Dataset.from_dict({"body": ["x"]}), text_field="body") == "text"
    with pytest.raises(SftkitError, match=r"columns \['instruction', 'output'\]"):
        data_format(Dataset.from_dict({"instruction": ["q"], "output": ["a"]}))
    with pytest.raises(SftkitError, match="CSV cannot store lists"):
        data_format(Dataset.from_dict({"messages": ["[{'role': 'user'}]"]}))


def test_csv_text_file_loads_and_corpus_mode_needs_text(tmp_path):
    from sftkit.recipe import load_data

    csv = tmp_path / "train.csv"
    csv.write_text("text\nhello there\nanother row\n")
    recipe, _, args = _parsed(tmp_path, train_file=str(csv), validation_file=None, assistant_only_loss=False,
                              corpus_mode=True)  # fmt: skip
    train, evaluation, fmt = load_data(recipe, args)
    assert (len(train), evaluation, fmt) == (2, None, "text")
    recipe.train_file = str(REPO / "data/world/chat_train.jsonl")
    with pytest.raises(SftkitError, match="corpus_mode groups plain text"):
        load_data(recipe, args)


def test_validation_file_must_match_train_format(tmp_path):
    from sftkit.recipe import load_data

    csv = tmp_path / "val.csv"
    csv.write_text("text\nhello\n")
    recipe, _, args = _parsed(tmp_path, validation_file=str(csv))
    with pytest.raises(SftkitError, match="validation_file holds text rows"):
        load_data(recipe, args)


# ---------------------------------------------------------------- tokenizer edits


def test_read_extra_tokens(tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("<a>\n\n  <b>  \n<a>\n")
    assert read_extra_tokens(f) == ["<a>", "<b>"]
    f.write_text("\n \n")
    with pytest.raises(SftkitError, match="has no tokens"):
        read_extra_tokens(f)


def test_add_tokens_grows_embeddings_around_the_mean(tiny_model_dir):
    from sftkit.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype="fp32")
    before = model.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(model, tok, ["<|merrow|>", "capital", "<|isle|>"])  # "capital" is already a word
    assert len(ids) == 2 and ids == [len(tok) - 2, len(tok) - 1]
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] == len(tok) == before.shape[0] + 2
    torch.testing.assert_close(weight[: before.shape[0]], before)
    # mean_resizing: new rows sit near the old mean, far closer than a typical old row does
    mean = before.mean(0)
    new_dist = (weight[ids] - mean).norm(dim=1).max()
    typical = (before - mean).norm(dim=1).median()
    assert new_dist < typical, (new_dist, typical)
    assert tok.tokenize("<|merrow|>") == ["<|merrow|>"]


def test_set_padding(tiny_model_dir):
    from sftkit.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir, dtype="fp32")
    n = len(tok)
    added = set_padding(model, tok, RecipeArguments(new_pad_token="<pad>"))
    assert added == [n] and tok.pad_token == "<pad>" and model.config.pad_token_id == n
    set_padding(model, tok, RecipeArguments(pad_token_id=7))
    assert tok.pad_token_id == 7 and model.config.pad_token_id == 7
    with pytest.raises(SftkitError, match="outside the vocabulary"):
        set_padding(model, tok, RecipeArguments(pad_token_id=10_000))


# ---------------------------------------------------------------- the command itself


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return env


def test_main_usage_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "sftkit"], capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and "train" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "sftkit", "trian"], capture_output=True, text=True, env=_env()
    )
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


def test_bad_input_fails_fast_with_exit_2(tmp_path):
    # Refused before any weights are read: the error names the problem and the fix.
    path = _tiny_recipe(tmp_path, train_file=str(tmp_path / "none.jsonl"))
    out = subprocess.run(
        [sys.executable, "-m", "sftkit", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "does not exist" in out.stderr and "Fix:" in out.stderr
    assert not (tmp_path / "run" / "run_info.json").exists()


@pytest.mark.slow
def test_train_command_lora_with_extra_tokens(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("<|merrow|>\n<|isle|>\n")
    path = _tiny_recipe(tmp_path, extra_tokens_file=str(tokens), max_eval_samples=32)
    cmd = [sys.executable, "-m", "sftkit", "train", "--config", str(path), "--max_steps", "30",
           "--per_device_train_batch_size", "8", "--logging_steps", "5", "--gradient_accumulation_steps", "2"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global batch size 16 = 8 per device x 2 accumulation x 1 process(es)" in out.stdout
    run = tmp_path / "run"
    info = json.loads((run / "run_info.json").read_text())
    assert info["global_batch_size"] == 16 and info["num_processes"] == 1
    assert info["versions"]["trl"] != "not installed" and info["hardware"]["device"] in ("cpu", "cuda", "mps")
    assert info["training"]["learning_rate"] == 1e-3 and info["data_format"] == "messages"

    metrics = json.loads((run / "metrics.json").read_text())
    losses = [r["loss"] for r in metrics["log_history"] if "loss" in r]
    assert metrics["global_step"] == 30 and len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses  # it learned
    assert metrics["eval_loss"] < losses[0]
    new_ids = metrics["new_token_ids"]
    assert len(new_ids) == 2

    # final/ holds the adapter and a tokenizer that knows the new tokens; the new rows were trained
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    assert (run / "final" / "adapter_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert tok.convert_tokens_to_ids(["<|merrow|>", "<|isle|>"]) == new_ids
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    # the new tokens' rows were trained: the saved embedding copy differs from the base model's mean-resized init
    embed = next(t for k, t in adapter.items() if "embed_tokens" in k)
    assert embed.shape[0] == len(tok)
    assert not list(run.glob(".final*")), "staging folder left behind"


@pytest.mark.slow
def test_train_command_corpus_mode_fills_every_block(tmp_path, monkeypatch):
    # Corpus mode = grouped texts: every row is exactly max_length tokens, so the tokens trained are
    # steps x batch x block with no padding at all.
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "sftkit", "train", "--config", "configs/recipes/tiny_corpus.yaml",
           "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "64",
           "--max_train_samples", "100", "--output_dir", str(out_dir)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["train"]["train_tokens"] == 3 * 4 * 64
    assert (out_dir / "final" / "model.safetensors").is_file()
    assert json.loads((out_dir / "run_info.json").read_text())["recipe"]["corpus_mode"] is True


@pytest.mark.slow
def test_train_command_qlora_4bit(tmp_path):
    # real bitsandbytes NF4 on the CPU: the 2024 --use_int4
    path = _tiny_recipe(tmp_path, load_in_4bit=True, max_eval_samples=8, max_train_samples=32)
    cmd = [sys.executable, "-m", "sftkit", "train", "--config", str(path), "--max_steps", "3",
           "--per_device_train_batch_size", "4", "--logging_steps", "1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        metrics["quantized_linear_layers"] == 4 * 7
    )  # 4 decoder layers x 7 linear projections, lm_head kept
    assert (
        metrics["global_step"] == 3 and (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    )
