"""The train command: an SFT recipe from a YAML file plus command-line overrides, thin over TRL's SFTTrainer.

    python -m sftkit train --config configs/recipes/tiny_lora.yaml [--learning_rate 5e-4 ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m sftkit train --config ...

Arguments are parsed by ``trl.TrlParser`` (transformers' ``HfArgumentParser`` plus ``--config``) into three
dataclasses: :class:`RecipeArguments` (data and tokenizer, defined here), ``trl.ModelConfig`` (model, LoRA,
4/8-bit) and ``trl.SFTConfig`` (every training knob). A YAML key is a field of one of them; a command-line flag
overrides it. Everything is checked before any weights are read. The run folder (``output_dir``) receives
``sftkit_run.json`` (the run's fingerprint: a different run is refused there, the same one resumes) and
``run_info.json`` at the start (global batch size, hardware, versions, the effective configuration),
checkpoints while training, the final model or adapter in ``final/`` and ``metrics.json`` at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sftkit.errors import SftkitError
from sftkit.validation import RunCheck, data_identity, record_run, validate_run

# Versions written into run_info.json: what a reader needs to reproduce or compare a run.
_VERSIONED = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
)
_DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
_HELP_FIX = "see `python -m sftkit train --help` for every key, and configs/recipes/*.yaml for examples."


@dataclass
class RecipeArguments:
    """What the 2024 trl_finetune.py flags did that TRL's own dataclasses do not: data files and tokenizer edits."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data: a local .csv/.jsonl/.json/.parquet file (or a hub dataset id)."},
    )
    validation_file: str | None = field(
        default=None,
        metadata={"help": "Validation data, same formats. Needed for eval_strategy=steps/epoch."},
    )
    corpus_mode: bool = field(
        default=False,
        metadata={
            "help": "Group texts: concatenate the text column and cut it into max_length blocks (TRL's 'wrapped' "
            "packing). For raw corpora; examples are split at block edges."
        },
    )
    extra_tokens_file: str | None = field(
        default=None,
        metadata={"help": "A text file with one new token per line, added to the tokenizer before training."},
    )
    pad_token_id: int | None = field(
        default=None,
        metadata={"help": "Use this existing token id for padding (pick one that never occurs in the data)."},
    )
    new_pad_token: str | None = field(
        default=None,
        metadata={"help": "Add this new token as the pad token (resizes the embeddings)."},
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "'auto' splits one model across all GPUs of a single process (the 2024 --split_model). "
            "Not with accelerate launch."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows only (a quick trial run)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation rows only."}
    )
    save_final_model: bool = field(
        default=True, metadata={"help": "Save the final model/adapter and tokenizer to <output_dir>/final."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "aliases": ["--overwrite"],
            "help": "Train into an output_dir that already holds a different run (its sftkit_run.json, "
            "checkpoints or final model differ from this run's). Without it such a folder is refused.",
        },
    )
    allow_pickle: bool = field(
        default=False,
        metadata={
            "aliases": ["--allow-pickle"],
            "help": "Accept a model whose weights are pickle files (pytorch_model.bin). Unpickling can run "
            "arbitrary code; by default only safetensors are read.",
        },
    )


# --------------------------------------------------------------------------------------------------------------
# Parsing


def make_parser():
    """The TrlParser for RecipeArguments, trl.ModelConfig and trl.SFTConfig (defaults fit the hardware)."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from sftkit.device import choose_precision, detect_device

    parser = TrlParser((RecipeArguments, ModelConfig, SFTConfig), prog="python -m sftkit train")
    # trl's SFTConfig defaults to bf16=True, which transformers refuses on a CPU. Default to what this
    # hardware supports; a recipe or a flag that names bf16/fp16 explicitly still wins (and is checked).
    parser.set_defaults(**choose_precision("auto").trainer_kwargs())
    # On a machine without an accelerator, use_cpu makes processes started by `accelerate launch` (torchrun)
    # join one gloo process group (DDP on CPU) instead of each training alone.
    parser.set_defaults(use_cpu=detect_device() == "cpu")
    return parser


def parse_args(argv: list[str] | None = None):
    """Parse ``--config file.yaml`` plus overrides into ``(RecipeArguments, ModelConfig, SFTConfig)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SftkitError(
                "--config needs a file name.", "pass e.g. --config configs/recipes/tiny_lora.yaml."
            )
        _check_config_file(argv[i + 1])
    parser = make_parser()
    try:
        recipe, model_args, train_args = parser.parse_args_and_config(argv)
    except ValueError as err:
        text = str(err)
        if "bf16" in text or "fp16" in text:
            fix = (
                "leave bf16/fp16 out of the recipe: sftkit picks bf16 on Ampere+ GPUs, fp16 on older GPUs and "
                "fp32 on a CPU. Set them only for hardware that has them."
            )
        elif "Unknown arguments" in text:
            fix = "check the spelling of the key(s) above; " + _HELP_FIX
        else:
            fix = _HELP_FIX
        raise SftkitError(f"the recipe's arguments are invalid: {text}", fix) from err
    return recipe, model_args, train_args


def _check_config_file(path: str) -> None:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SftkitError(
            f"recipe file {path!r} does not exist (relative to {os.getcwd()}).",
            "pass a YAML file, e.g. --config configs/recipes/tiny_lora.yaml from the repository root.",
        )
    try:
        content = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SftkitError(f"recipe file {path!r} is not valid YAML: {err}", "fix the YAML syntax.") from err
    if not isinstance(content, dict):
        raise SftkitError(
            f"recipe file {path!r} must hold a mapping of keys to values, got {type(content).__name__}.",
            "write one `key: value` per line, e.g. `learning_rate: 2.0e-4`.",
        )


# --------------------------------------------------------------------------------------------------------------
# Checks that need no weights


def global_batch_size(train_args, num_processes: int | None = None) -> int:
    """Examples per optimizer step: per-device batch × gradient accumulation × processes."""
    n = train_args.world_size if num_processes is None else num_processes
    return int(train_args.per_device_train_batch_size) * int(train_args.gradient_accumulation_steps) * int(n)


def _distributed_engine() -> str:
    """'deepspeed', 'fsdp' or '' from the variables accelerate launch sets for its engines."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return ""


def validate(recipe: RecipeArguments, model_args, train_args, num_processes: int = 1) -> None:
    """Raise SftkitError for missing inputs or options that cannot work together (via sftkit.validation)."""
    from sftkit.validation import check_model_folder, check_options

    # Precision vs hardware, QLoRA without bitsandbytes or LoRA, quantization under DeepSpeed, tokens in the config.
    check_options(
        train_args,
        use_peft=bool(model_args.use_peft),
        load_in_4bit=bool(model_args.load_in_4bit),
        load_in_8bit=bool(model_args.load_in_8bit),
        distributed_engine=_distributed_engine(),
    )
    if not model_args.model_name_or_path:
        raise SftkitError(
            "no model given (model_name_or_path is empty).",
            "set `model_name_or_path:` in the recipe: a local folder such as data/tiny-base or a hub id.",
        )
    if not recipe.train_file:
        raise SftkitError(
            "no training data given (train_file is empty).",
            "set `train_file:` to a .csv or .jsonl file (columns: text, or prompt+completion, or messages).",
        )
    for name in ("train_file", "validation_file", "extra_tokens_file"):
        value = getattr(recipe, name)
        if value and _looks_local(value) and not Path(value).is_file():
            raise SftkitError(
                f"{name} {value!r} does not exist (relative paths start from {os.getcwd()}).",
                f"check the path of `{name}:`; run the command from the repository root for the shipped recipes.",
            )
    if (
        recipe.train_file
        and _looks_local(recipe.train_file)
        and Path(recipe.train_file).suffix in (".txt", "")
    ):
        raise SftkitError(
            f"train_file {recipe.train_file!r} is not a table.",
            f"use one of {', '.join(_DATA_SUFFIXES)} with a `text` column (csv) or `messages` rows (jsonl).",
        )
    if Path(model_args.model_name_or_path).is_dir():  # custom code or pickle weights: refused unless asked
        check_model_folder(
            model_args.model_name_or_path,
            trust_remote_code=bool(train_args.trust_remote_code),
            allow_pickle=recipe.allow_pickle,
        )
    if recipe.device_map is not None:
        if num_processes > 1 or _distributed_engine():
            raise SftkitError(
                f"device_map={recipe.device_map!r} splits one model across the GPUs of ONE process, but this run "
                f"has {num_processes} processes{' under ' + _distributed_engine() if _distributed_engine() else ''}.",
                "run it with plain `python -m sftkit train ...` (no accelerate launch), or remove device_map and "
                "shard with configs/accelerate/fsdp2.yaml or a ZeRO-3 config instead.",
            )
    if recipe.pad_token_id is not None and recipe.new_pad_token is not None:
        raise SftkitError(
            "both pad_token_id and new_pad_token are set.",
            "choose one: reuse an existing id (pad_token_id) or add a new token (new_pad_token).",
        )
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(recipe, name)
        if value is not None and value < 1:
            raise SftkitError(
                f"{name} must be at least 1, got {value}.", f"remove `{name}` or set it to N >= 1."
            )
    if recipe.corpus_mode:
        if not train_args.max_length:
            raise SftkitError(
                "corpus_mode needs a block size, but max_length is empty.",
                "set `max_length:` (the 2024 --block_size), e.g. 512.",
            )
        if train_args.assistant_only_loss or train_args.completion_only_loss:
            raise SftkitError(
                "corpus_mode trains on every token of the text, so assistant_only_loss/completion_only_loss "
                "cannot apply.",
                "turn corpus_mode off for chat or prompt/completion data, or drop the *_only_loss option.",
            )
    if train_args.eval_strategy != "no" and not recipe.validation_file:
        raise SftkitError(
            f"eval_strategy={train_args.eval_strategy!r} but no validation_file is given.",
            'set `validation_file:`, or `eval_strategy: "no"`.',
        )
    if train_args.per_device_train_batch_size < 1 or train_args.gradient_accumulation_steps < 1:
        raise SftkitError(
            "per_device_train_batch_size and gradient_accumulation_steps must be at least 1.",
            "set both to positive integers.",
        )


def validate_recipe_run(recipe: RecipeArguments, model_args: Any, train_args: Any, train_ds: Any) -> RunCheck:
    """The run-level checks of sftkit.validation for a recipe: data against the tokenizer, then the output folder.

    Reads only the tokenizer (no weights). Rows longer than max_length are reported as a warning, not refused.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=bool(train_args.trust_remote_code),
        **({"revision": model_args.model_revision} if model_args.model_revision not in (None, "main") else {}),
    )
    peft = None
    if model_args.use_peft:
        peft = {k: v for k, v in asdict(model_args).items() if k.startswith(("lora_", "use_rs", "use_dora"))}
    return validate_run(
        train_args,
        model=model_args.model_name_or_path,
        train_dataset=train_ds,
        tokenizer=tokenizer,
        peft_config=peft,
        load_in_4bit=bool(model_args.load_in_4bit),
        load_in_8bit=bool(model_args.load_in_8bit),
        data_id={
            **data_identity(recipe.train_file, recipe.validation_file, recipe.extra_tokens_file),
            "max_train_samples": recipe.max_train_samples,
            "corpus_mode": recipe.corpus_mode,
            "pad_token_id": recipe.pad_token_id,
            "new_pad_token": recipe.new_pad_token,
        },
        overwrite_output_dir=recipe.overwrite_output_dir,
        on_truncation="warn",
        distributed_engine=_distributed_engine(),
    )


def _looks_local(value: str) -> bool:
    """True for something meant as a file path rather than a hub dataset id."""
    return (
        Path(value).suffix in _DATA_SUFFIXES + (".txt",)
        or value.startswith((".", "/", "~"))
        or os.path.exists(value)
    )


# --------------------------------------------------------------------------------------------------------------
# Data


def data_format(dataset, text_field: str = "text") -> str:
    """Name the trainer input mode of ``dataset``: "messages", "prompt-completion" or "text"."""
    cols = dataset.column_names
    if "messages" in cols:
        if not isinstance(dataset[0]["messages"], list):
            raise SftkitError(
                "the `messages` column holds strings, not lists of {role, content} (a CSV cannot store lists).",
                'save chat data as .jsonl with one {"messages": [...]} per line.',
            )
        return "messages"
    if "prompt" in cols and "completion" in cols:
        return "prompt-completion"
    if text_field in cols:
        return "text"
    raise SftkitError(
        f"the data has columns {cols}, none of which the trainer can use.",
        f"provide a `{text_field}` column (or set dataset_text_field), a `prompt` and a `completion` column, "
        "or `messages` (jsonl); Alpaca-style rows need converting to messages first.",
    )


def load_data(recipe: RecipeArguments, train_args):
    """Load and check the train (and validation) splits; returns ``(train, eval_or_None, format)``."""
    from sftkit.data import load_split

    train = load_split(recipe.train_file, "train")
    fmt = data_format(train, train_args.dataset_text_field)
    if recipe.corpus_mode and fmt != "text":
        raise SftkitError(
            f"corpus_mode groups plain text, but {recipe.train_file!r} holds {fmt} rows.",
            f"turn corpus_mode off, or provide a `{train_args.dataset_text_field}` column.",
        )
    if train_args.assistant_only_loss and fmt != "messages":
        raise SftkitError(
            f"assistant_only_loss needs chat rows (`messages`), but {recipe.train_file!r} holds {fmt} rows.",
            "drop assistant_only_loss (prompt/completion data is trained on completions by default).",
        )
    if recipe.max_train_samples:
        train = train.select(range(min(recipe.max_train_samples, len(train))))
    evaluation = None
    if recipe.validation_file:
        evaluation = load_split(recipe.validation_file, "validation")
        eval_fmt = data_format(evaluation, train_args.dataset_text_field)
        if eval_fmt != fmt:
            raise SftkitError(
                f"train_file holds {fmt} rows but validation_file holds {eval_fmt} rows.",
                "give both files the same format.",
            )
        if recipe.max_eval_samples:
            evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    return train, evaluation, fmt


def read_extra_tokens(path: str | os.PathLike) -> list[str]:
    """Tokens from a file, one per line, stripped of surrounding spaces; blank lines and repeats dropped.

    A recipe's token file is usually edited by hand, where a stray space is a typo; ``sftkit.tokens`` (used
    directly from Python) keeps lines verbatim for byte-level tokens that start with a space.
    """
    from sftkit.tokens import read_token_file

    if not any(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()):
        raise SftkitError(f"extra_tokens_file {str(path)!r} has no tokens.", "write one token per line.")
    return list(dict.fromkeys(t.strip() for t in read_token_file(path)))


def add_tokens(model, tokenizer, tokens: list[str], *, special: bool = False) -> list[int]:
    """Add ``tokens`` the tokenizer lacks, grow the embeddings (new rows start at the mean); return their ids."""
    from sftkit.tokens import add_new_tokens

    # A new token starts as an "average" token (the mean of the old rows), not a random vector the model has
    # never seen; sftkit.tokens does the resize and the initialisation for every entry point.
    return tokenizer.convert_tokens_to_ids(add_new_tokens(model, tokenizer, tokens, init="mean", special=special))


def set_padding(model, tokenizer, recipe: RecipeArguments) -> list[int]:
    """Apply pad_token_id / new_pad_token; returns ids of tokens added to the vocabulary."""
    from sftkit.tokens import add_pad_token

    if recipe.pad_token_id is not None:
        if not 0 <= recipe.pad_token_id < len(tokenizer):
            raise SftkitError(
                f"pad_token_id {recipe.pad_token_id} is outside the vocabulary (0..{len(tokenizer) - 1}).",
                "pick an existing id that never occurs in your data, or use new_pad_token to add one.",
            )
        token = tokenizer.convert_ids_to_tokens(recipe.pad_token_id)
    elif recipe.new_pad_token is not None:
        token = recipe.new_pad_token
    else:  # keep the tokenizer's own pad token; the configs still learn its id
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return []
    added = add_pad_token(model, tokenizer, token)
    return [] if added is None else [added]


# --------------------------------------------------------------------------------------------------------------
# Model


def load_model(recipe: RecipeArguments, model_args, train_args):
    """Load model and tokenizer as the recipe says (dtype, 4/8-bit, device_map); returns (model, tokenizer)."""
    from trl import get_quantization_config

    from sftkit.loading import load_model_and_tokenizer

    quantization = get_quantization_config(model_args)
    device_map = recipe.device_map
    if quantization is not None and device_map is None:
        # bitsandbytes weights are placed at load time: each process puts its copy on its own device.
        from accelerate import PartialState

        state = PartialState()
        device_map = {"": state.local_process_index} if state.device.type == "cuda" else {"": "cpu"}
    kwargs = {}
    if model_args.model_revision not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        dtype=model_args.dtype or "auto",
        device_map=device_map,
        quantization_config=quantization,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=train_args.trust_remote_code,
        allow_pickle=recipe.allow_pickle,
        **kwargs,
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input gradients so LoRA layers on a frozen 4/8-bit base train stably.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(train_args.gradient_checkpointing),
            gradient_checkpointing_kwargs=train_args.gradient_checkpointing_kwargs,
        )
    return model, tokenizer


def peft_config_for(model_args, model, new_token_ids: list[int]):
    """trl's LoraConfig from ModelConfig; with new tokens, the embedding matrices train in full as well."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is not None and new_token_ids:
        # LoRA freezes the embeddings, so new tokens would keep their initial vectors. peft's cheaper
        # trainable_token_indices (train only the new rows) breaks TRL 1.16's fused LM-head loss, which reads
        # lm_head.weight/bias directly; modules_to_save trains full copies of the input and output embeddings
        # (vocab x hidden each) and works with it. The saved adapter then includes both matrices.
        names = {module: name for name, module in model.named_modules()}
        wanted = [names[m].split(".")[-1] for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None and m in names]  # fmt: skip
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(wanted))
    return config


# --------------------------------------------------------------------------------------------------------------
# Run records


def hardware_summary() -> dict:
    """Device, GPU names and memory, CPU count, python version."""
    import torch

    from sftkit.device import describe_device

    info = describe_device()
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    return info


def versions() -> dict:
    """Installed versions of the training stack ("not installed" where absent)."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _engine_name(distributed_type: str, n_processes: int) -> str:
    """What accelerate actually set up: deepspeed, fsdp, ddp (any MULTI_* type) or single."""
    kind = distributed_type.split(".")[-1]
    if kind == "DEEPSPEED":
        return "deepspeed"
    if kind == "FSDP":
        return "fsdp"
    return "ddp" if n_processes > 1 else "single"


def _precision_name(train_args) -> str:
    return "bf16" if train_args.bf16 else "fp16" if train_args.fp16 else "fp32"


def run_info(recipe: RecipeArguments, model_args, train_args, argv: list[str]) -> dict:
    """What run_info.json records: batch arithmetic, hardware, versions and the full effective configuration."""
    n = train_args.world_size
    state_type = str(getattr(train_args.distributed_state, "distributed_type", "NO"))
    return {
        "command": "python -m sftkit train " + shlex.join(argv),
        "global_batch_size": global_batch_size(train_args, n),
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "num_processes": n,
        "distributed_type": state_type.split(".")[-1],
        "engine": _engine_name(state_type, n),
        "requested_engine": _distributed_engine() or None,
        "precision": _precision_name(train_args),
        "hardware": hardware_summary(),
        "versions": versions(),
        "recipe": asdict(recipe),
        "model": asdict(model_args),
        "training": json.loads(train_args.to_json_string()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _print_run_info(info: dict) -> None:
    hw = info["hardware"]
    device = ", ".join(hw.get("gpus", [])) or f"CPU ({hw['cpu_count']} cores)"
    v = info["versions"]
    print(
        f"[sftkit train] global batch size {info['global_batch_size']} = {info['per_device_train_batch_size']} "
        f"per device x {info['gradient_accumulation_steps']} accumulation x {info['num_processes']} process(es)\n"
        f"[sftkit train] engine {info['engine']} ({info['distributed_type']}), precision {info['precision']}, "
        f"device {device}\n"
        f"[sftkit train] torch {v['torch']} | transformers {v['transformers']} | trl {v['trl']} | peft {v['peft']} "
        f"| accelerate {v['accelerate']} | deepspeed {v['deepspeed']}",
        flush=True,
    )
    if info["requested_engine"] and info["requested_engine"] != info["engine"]:
        print(
            f"[sftkit train] note: the launch config asked for {info['requested_engine']} but accelerate set up "
            f"{info['engine']} ({info['distributed_type']}); DeepSpeed and FSDP engage only on GPUs.",
            flush=True,
        )


def rank_report(trainer, seconds: float) -> dict:
    """This process's view: peak memory and a checksum of its (local) trainable parameters."""
    import torch

    from sftkit.summary import read_peak_memory_gb

    digest = hashlib.sha256()
    n = 0
    for name, param in sorted(trainer.model.named_parameters(), key=lambda kv: kv[0]):
        if param.requires_grad:
            local = (
                param.to_local() if hasattr(param, "to_local") else param
            )  # FSDP2 DTensor -> this rank's shard
            data = local.detach().float().cpu().contiguous()
            digest.update(name.encode())
            digest.update(data.numpy().tobytes())
            n += data.numel()
    report = {
        "rank": trainer.args.process_index,
        "seconds": round(seconds, 2),
        # Under DDP every rank holds the whole model, so these must be identical on all ranks. ZeRO-3 and FSDP
        # shard parameters, so there each rank hashes only its own shard and the values differ by design.
        "local_trainable_sha256": digest.hexdigest(),
        "local_trainable_numel": n,
        "peak_memory_gb": round(read_peak_memory_gb() or 0.0, 3),
    }
    if torch.cuda.is_available():
        report["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return report


def _save_final(trainer, tokenizer, out: Path) -> None:
    """Save model + tokenizer to ``out`` completely or not at all; every process takes part (sharded states).

    The same protocol as sftkit.io.atomic_dir, with a staging name every process knows: leftovers of an
    interrupted save are cleaned, the files go to a hidden sibling, which then replaces ``out`` in one rename.
    """
    from sftkit.io import clean_stale, replace_dir

    staging = out.with_name(f".{out.name}.tmp-final")
    if trainer.is_world_process_zero():
        clean_stale(out)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))  # gathers ZeRO-3/FSDP shards; only the main process writes
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(staging)
            # The Trainer pickles its TrainingArguments here; run_info.json holds them as JSON, and final/ keeps
            # to safetensors and JSON so that loading it never unpickles anything.
            (staging / "training_args.bin").unlink(missing_ok=True)
            replace_dir(staging, out)
    except BaseException:
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    trainer.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------------
# The command


def train(
    recipe: RecipeArguments, model_args, train_args, argv: list[str] | None = None, callbacks=None
) -> dict:
    """Validate, record run_info.json, train with SFTTrainer, save ``final/`` and metrics.json; returns metrics."""
    from accelerate.utils import gather_object
    from trl import SFTTrainer

    from sftkit.io import atomic_write_json
    from sftkit.summary import RunTimer, training_summary

    argv = list(argv or [])
    n_proc = train_args.world_size
    validate(recipe, model_args, train_args, n_proc)
    train_ds, eval_ds, fmt = load_data(recipe, train_args)
    if recipe.corpus_mode:
        # The 2024 group_texts: concatenate all texts (EOS between them) and cut into max_length blocks.
        train_args.packing = True
        train_args.packing_strategy = "wrapped"
        train_args.padding_free = False
    check = validate_recipe_run(recipe, model_args, train_args, train_ds)
    out = Path(train_args.output_dir)
    info = run_info(recipe, model_args, train_args, argv)
    info["data_format"] = fmt
    info["train_rows"] = len(train_ds)
    info["eval_rows"] = len(eval_ds) if eval_ds is not None else 0
    info["fingerprint"] = check.fingerprint["sha256"]
    info["resumes_run"] = check.resumes
    if train_args.process_index == 0:
        record_run(out, check.fingerprint)
        atomic_write_json(out / "run_info.json", info)  # before loading anything: a crash still leaves a record

    model, tokenizer = load_model(recipe, model_args, train_args)
    new_ids = set_padding(model, tokenizer, recipe)
    if recipe.extra_tokens_file:
        new_ids += add_tokens(model, tokenizer, read_extra_tokens(recipe.extra_tokens_file))
    # Full fine-tuning trains the whole embedding matrix, new rows included; LoRA needs them named.
    peft_config = peft_config_for(model_args, model, new_ids)

    trainer = SFTTrainer(
        model=model,
        args=train_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    # train_args.distributed_state is accelerate's PartialState, which says MULTI_GPU under FSDP and DeepSpeed
    # too; the trainer's Accelerator knows which engine it set up.
    accelerator_type = str(trainer.accelerator.distributed_type)
    info["distributed_type"] = accelerator_type.split(".")[-1]
    info["engine"] = _engine_name(accelerator_type, n_proc)
    if train_args.process_index == 0:
        _print_run_info(info)
        atomic_write_json(out / "run_info.json", info)
    with RunTimer() as timer:
        result = trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    metrics: dict = {"train_loss": result.training_loss, "global_step": result.global_step}
    if eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    metrics["train"] = training_summary(trainer, timer.seconds, timer.peak_memory_gb)
    metrics["ranks"] = gather_object([rank_report(trainer, timer.seconds)])
    metrics["log_history"] = trainer.state.log_history
    metrics["global_batch_size"] = info["global_batch_size"]
    metrics["num_processes"] = n_proc
    metrics["engine"] = info["engine"]
    metrics["new_token_ids"] = new_ids
    # bitsandbytes layers actually in the model: proof that load_in_4bit/8bit took effect
    metrics["quantized_linear_layers"] = sum(
        type(m).__module__.startswith("bitsandbytes") and type(m).__name__ in ("Linear4bit", "Linear8bitLt")
        for m in trainer.model.modules()
    )
    if recipe.save_final_model:
        _save_final(trainer, tokenizer, out / "final")
    if trainer.is_world_process_zero():
        atomic_write_json(out / "metrics.json", metrics)
        print(
            f"[sftkit train] done: {metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}"
            + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
            + f"; outputs in {out}",
            flush=True,
        )
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):
        trainer.end()  # transformers >= 5.18: finish trackers, destroy the process group
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sftkit train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        recipe, model_args, train_args = parse_args(argv)
        train(recipe, model_args, train_args, argv)
    except SftkitError as err:
        print(f"sftkit train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
