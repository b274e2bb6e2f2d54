"""Load a causal LM and its tokenizer, with the input checked before any weights are read."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sftkit.device import choose_precision, normalize_precision_name
from sftkit.errors import SftkitError
from sftkit.validation import check_model_folder

_EXAMPLE_SOURCES = (
    'sftkit.paths.TINY_MODEL_DIR (the tiny model in this repo) or a Hub id such as "Qwen/Qwen2.5-0.5B"'
)
# Hub options the tokenizer needs as much as the model (a gated repo needs the token for both).
_SHARED_HUB_KWARGS = ("token", "revision", "cache_dir", "local_files_only")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    quantization_config=None,
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` from a local folder or a Hub id, with a usable pad token.

    Safe by default: a model that ships its own code (``auto_map``) is refused unless ``trust_remote_code=True``,
    and weights are read from safetensors only unless ``allow_pickle=True`` (see sftkit.validation).
    """
    if "torch_dtype" in model_kwargs:
        raise SftkitError(
            "torch_dtype= is the transformers 4 name of the argument.",
            'pass dtype= instead, e.g. dtype="bf16" or dtype=torch.bfloat16.',
        )
    source, is_local = _resolve_source(name_or_path)
    if is_local:
        check_model_folder(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    load_dtype = _resolve_dtype(dtype)

    kwargs: dict = {"dtype": load_dtype, "trust_remote_code": trust_remote_code, **model_kwargs}
    if not allow_pickle:
        kwargs.setdefault("use_safetensors", True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer_kwargs = {k: model_kwargs[k] for k in _SHARED_HUB_KWARGS if k in model_kwargs}

    try:
        # Tokenizer first: it is small, so a bad id or a missing cache fails in a second
        # instead of after a multi-GB weight download.
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **tokenizer_kwargs
        )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise SftkitError(
            f"{source!r} needs its own Python code to load; running it executes code from the model's authors on "
            "this machine with your permissions.",
            "read the model's .py files on its Hub page first; if you trust them, pass trust_remote_code=True.",
        ) from exc
    except OSError as exc:
        if not is_local and not allow_pickle and "safetensors" in str(exc).lower():
            raise SftkitError(
                f"{source!r} has no safetensors weights, only pickle files; unpickling a file can run arbitrary "
                "code, so sftkit loads safetensors only.",
                "look for a safetensors revision of the model, or opt in with allow_pickle=True if you trust it.",
            ) from exc
        if is_local:
            raise
        raise _hub_error(source, exc) from exc

    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Return (source, is_local), raising SftkitError for local paths that cannot be a model."""
    text = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        raise SftkitError(f"Empty or invalid model name {name_or_path!r}.", f"pass {_EXAMPLE_SOURCES}.")
    path = Path(text).expanduser()
    # A Hub id is "name" or "org/name"; anything else that looks like a filesystem path is
    # treated as one, so a typo in a local path is not sent to the Hub as a bogus model id.
    looks_local = (
        isinstance(name_or_path, os.PathLike)
        or path.exists()
        or text.startswith((".", "/", "~", "\\"))
        or os.path.isabs(text)
        or text.count("/") > 1
    )
    if not looks_local:
        return text, False

    if not path.exists():
        raise SftkitError(
            f"Model folder {text!r} does not exist (relative paths start from the current "
            f"directory, {os.getcwd()}).",
            f"check the path, or use {_EXAMPLE_SOURCES}.",
        )
    if not path.is_dir():
        raise SftkitError(
            f"{text!r} is a file, but a model is a folder (with config.json, weights and tokenizer files).",
            "pass the folder that contains config.json, as written by model.save_pretrained(...).",
        )
    if not (path / "config.json").is_file():
        raise SftkitError(
            f"Folder {text!r} has no config.json, so it is not a saved model.", _missing_config_fix(path)
        )
    return str(path), True


def _missing_config_fix(path: Path) -> str:
    """Suggest what the user probably meant when a folder has no config.json."""
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or "<base model>"
        except (OSError, ValueError):
            base = "<base model>"
        return (
            "this folder is a LoRA adapter, not a full model: load the base model and attach it, e.g. "
            f'model, tok = load_model_and_tokenizer("{base}"); '
            f'model = peft.PeftModel.from_pretrained(model, "{path}").'
        )
    children = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())
    if children:
        return f"pass one of its sub-folders that holds a model: {', '.join(children[:5])}."
    return "pass the folder that contains config.json, as written by model.save_pretrained(...)."


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "auto"/"bf16"/"fp16"/"fp32" (or a torch.dtype) to the dtype the weights are loaded in."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise SftkitError(
            f"dtype must be a string or a torch.dtype, got {type(dtype).__name__}.",
            'pass dtype="auto", "bf16", "fp16", "fp32" or e.g. torch.bfloat16.',
        )
    name = normalize_precision_name(dtype)
    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    precision = choose_precision("auto")
    if precision.fp16:
        # fp16 mixed precision needs fp32 master weights: the Trainer's grad scaler refuses fp16
        # parameters ("Attempting to unscale FP16 gradients"), so full fine-tuning of an fp16
        # model fails. Load fp32 by default; LoRA users short on memory can ask for dtype="fp16".
        return torch.float32
    return precision.dtype


def _hub_error(source: str, exc: OSError) -> SftkitError:
    """Turn a transformers OSError for a Hub id into an actionable SftkitError."""
    if _offline():
        return SftkitError(
            f"{source!r} is not in the local Hugging Face cache and this machine is offline "
            "(HF_HUB_OFFLINE=1), so it cannot be downloaded.",
            "connect to the internet and unset HF_HUB_OFFLINE (then load once to fill the cache), "
            "or pass a local model folder, e.g. sftkit.paths.TINY_MODEL_DIR.",
        )
    return SftkitError(
        f"Could not load {source!r} from the Hugging Face Hub: {exc}",
        "check the id on https://huggingface.co/models (it is case-sensitive, 'org/name'); for a gated "
        "model accept its licence on the model page and log in with `hf auth login`.",
    )


def _offline() -> bool:
    """True when Hub downloads are disabled, whether read at import time or set since."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token if it lacks one and keep the model's configs in sync."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SftkitError(
                "The tokenizer has neither a pad token nor an EOS token, so batches cannot be padded.",
                "add one before training: tokenizer.add_special_tokens({'pad_token': '<pad>'}) "
                "then model.resize_token_embeddings(len(tokenizer)).",
            )
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn(
            f"The tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r} for padding. "
            "This is safe with TRL, which excludes padding from the loss by the attention mask, so the "
            "EOS that ends each example is still trained. A collator that masks labels by pad_token_id "
            "would also mask that EOS and the model might never learn to stop.",
            UserWarning,
            stacklevel=3,
        )
    pad_id = tokenizer.pad_token_id
    # generate() falls back to (and warns about) its own pad id when these disagree.
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id
    if hasattr(model.config, "pad_token_id"):
        model.config.pad_token_id = pad_id
