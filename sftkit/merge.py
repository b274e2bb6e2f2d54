"""Merge a LoRA adapter into its base model and save a plain transformers model: ``python -m sftkit merge``.

The adapter is checked against the base before any weights are read (every tensor's shape against the
module it patches, on a weightless "meta" copy of the base), the merge is verified (merged logits ==
adapter logits; the saved folder reloads to the same logits), and the output folder appears complete or
not at all (written next to its final place, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from sftkit.errors import SftkitError
from sftkit.io import atomic_dir

TRAINING_INFO = "training_info.json"  # optional, next to the adapter: {"data", "hyperparameters", "metrics"}
PROBE_TEXT = "The Isle of Merrow has sixteen towns. Who lives in Oakridge, and what do they do for a living?"
# Largest |merged - adapter| logit difference accepted, relative to the largest |logit|. Merging is exact in
# exact arithmetic; what remains is rounding of W + BA in the weights' dtype.
MERGE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PREFIX = "base_model.model."
# Adapter tensor name (after the prefix) -> (module path, what it is).
_ADAPTER_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?|"
    r"lora_embedding_A|lora_embedding_B|token_adapter\.trainable_tokens_delta|base_layer\.weight)$"
)


@dataclass
class MergeResult:
    """What merge_adapter did: the merged model, its tokenizer and the checks' figures."""

    model: nn.Module
    tokenizer: object
    max_abs_logit_diff: float
    max_abs_logit: float
    resized_vocab: int | None = None
    notes: list[str] = field(default_factory=list)


def _adapter_files(adapter: Path) -> tuple[dict, Path]:
    """Return (adapter_config dict, weights file), with clear errors for a folder that is not an adapter."""
    if not adapter.is_dir():
        raise SftkitError(
            f"adapter folder {str(adapter)!r} does not exist.",
            "pass the folder written by trainer.model.save_pretrained(...) (it holds adapter_config.json).",
        )
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        hint = (
            " It has a config.json: it is already a full model, nothing to merge."
            if (adapter / "config.json").is_file()
            else ""
        )
        raise SftkitError(
            f"{str(adapter)!r} has no adapter_config.json, so it is not a PEFT adapter.{hint}",
            "pass the folder written by a PeftModel's save_pretrained(...).",
        )
    config = json.loads(config_path.read_text())
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return config, adapter / name
    raise SftkitError(
        f"{str(adapter)!r} has adapter_config.json but no adapter_model.safetensors (or .bin).",
        "the save was interrupted or files were lost: save the adapter again.",
    )


def _adapter_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file header (safetensors) without loading the tensors."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(weights, map_location="meta", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _meta_model(config) -> nn.Module:
    """The base architecture without weights (no memory, no download beyond config.json)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _io_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module or (num_embeddings, embedding_dim) of an embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return tuple(module.weight.shape)
    return None


def check_adapter_matches_base(
    base_config, adapter: str | os.PathLike, adapter_vocab: int | None = None
) -> int | None:
    """Raise SftkitError unless every adapter tensor fits the base's modules; returns the vocab size to resize to."""
    adapter = Path(adapter)
    adapter_config, weights = _adapter_files(adapter)
    peft_type = adapter_config.get("peft_type", "?")
    if peft_type != "LORA":
        raise SftkitError(
            f"the adapter is a {peft_type} adapter; this command merges LoRA adapters (including DoRA/rsLoRA).",
            "load it with peft.PeftModel.from_pretrained(base, adapter) and call merge_and_unload() if that "
            "adapter type supports merging (prompt-learning adapters cannot be merged).",
        )
    if getattr(base_config, "quantization_config", None):
        raise SftkitError(
            "the base model is saved quantized (its config.json has a quantization_config): merging into "
            "4-/8-bit weights re-quantizes W + BA and loses most of the small LoRA update.",
            "pass the original 16-/32-bit base model (the one the quantized copy was made from).",
        )
    meta = _meta_model(base_config)
    shapes = _adapter_shapes(weights)
    modules = dict(meta.named_modules())
    params = dict(meta.named_parameters())
    embedding_rows: set[int] = set()
    problems: list[str] = []
    seen_modules: set[str] = set()

    for key, shape in shapes.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if name in params:  # a whole module saved (modules_to_save): must match, vocab rows may have grown
            want = tuple(params[name].shape)
            if shape != want:
                vocab_rows = (
                    len(want) == len(shape) == 2 and want[1] == shape[1] and want[0] == meta.config.vocab_size
                )
                if vocab_rows:
                    embedding_rows.add(shape[0])
                else:
                    problems.append(f"{name}: adapter {list(shape)}, base {list(want)}")
            continue
        match = _ADAPTER_KEY.match(name)
        if match is None:
            continue  # a tensor kind this check does not know: let PEFT judge it
        module_name, kind = match["module"], match["kind"]
        seen_modules.add(module_name)
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{module_name}: the adapter patches it, the base has no such module")
            continue
        sizes = _io_sizes(module)
        if sizes is None:
            continue
        n_in, n_out = sizes
        expected = {
            "lora_A.weight": (1, n_in),
            "lora_B.weight": (0, n_out),
            "lora_magnitude_vector": (0, n_out),
            "lora_magnitude_vector.weight": (0, n_out),
            "lora_embedding_B": (0, n_out),
            "token_adapter.trainable_tokens_delta": (1, n_out),
        }
        if kind in ("lora_embedding_A", "base_layer.weight") and isinstance(module, nn.Embedding):
            rows = shape[1] if kind == "lora_embedding_A" else shape[0]
            if rows != n_in:
                embedding_rows.add(rows)
            if kind == "base_layer.weight" and shape[1] != n_out:
                problems.append(f"{name}: adapter {list(shape)}, base embedding dim {n_out}")
            continue
        if kind in expected:
            dim, size = expected[kind]
            if len(shape) <= dim or shape[dim] != size:
                problems.append(
                    f"{name}: adapter {list(shape)} does not fit {module_name} (in {n_in}, out {n_out})"
                )

    # Modules the adapter's own config targets in this base but holds no weights for: a deeper or otherwise
    # different base (a 2-layer adapter fits the first 2 layers of a 4-layer model shape for shape).
    targets = adapter_config.get("target_modules")
    if (
        isinstance(targets, list)
        and not adapter_config.get("layers_to_transform")
        and not adapter_config.get("target_parameters")
    ):
        untouched = [
            n
            for n, m in modules.items()
            if n not in seen_modules
            and _io_sizes(m) is not None
            and any(n == t or n.endswith(f".{t}") for t in targets)
            and not any(n == e or n.endswith(f".{e}") for e in adapter_config.get("exclude_modules") or [])
        ]
        if untouched:
            problems.append(
                f"{len(untouched)} module(s) of the base match the adapter's target_modules but the adapter has "
                f"no weights for them, e.g. {untouched[0]}"
            )

    problems += _recorded_base_differences(adapter_config, base_config)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        recorded = adapter_config.get("base_model_name_or_path") or "not recorded"
        raise SftkitError(
            f"the adapter does not fit this base model ({base_config.model_type}, hidden "
            f"{getattr(base_config, 'hidden_size', '?')}, {getattr(base_config, 'num_hidden_layers', '?')} layers): "
            f"{shown}.",
            f"pass the base the adapter was trained on (adapter_config.json records: {recorded}).",
        )

    if embedding_rows:
        rows = max(embedding_rows)
        explained = adapter_vocab is not None and meta.config.vocab_size < rows and adapter_vocab <= rows
        if len(embedding_rows) > 1 or not explained:
            raise SftkitError(
                f"the adapter's embeddings have {sorted(embedding_rows)} rows but the base has "
                f"{meta.config.vocab_size}, and the adapter folder has no tokenizer that explains the difference.",
                "save the tokenizer used in training next to the adapter (tokenizer.save_pretrained(adapter_dir)) "
                "or pass the base the adapter was trained on.",
            )
        return rows
    return None


_ARCH_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)


def _recorded_base_differences(adapter_config: dict, base_config) -> list[str]:
    """Architecture fields where the base recorded in adapter_config.json (if readable here) differs from ``base``."""
    from transformers import AutoConfig

    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded:
        return []
    try:  # a local folder, or a Hub id already in the cache; never a download
        recorded_config = AutoConfig.from_pretrained(recorded, local_files_only=True)
    except Exception:  # noqa: BLE001 - not readable here: nothing to compare, the shape checks still apply
        return []
    return [
        f"the adapter was trained on {recorded} with {f}={getattr(recorded_config, f, None)}, this base has "
        f"{getattr(base_config, f, None)}"
        for f in _ARCH_FIELDS
        if getattr(recorded_config, f, None) != getattr(base_config, f, None)
    ]


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits.float()


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    probe_text: str = PROBE_TEXT,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Check, load, merge and verify: returns the merged plain model with its tokenizer and the logit check.

    The checks go through :mod:`sftkit.validation`: no custom model code unless ``trust_remote_code``, no pickle
    weights unless ``allow_pickle``, and an adapter that fits the base (:func:`~sftkit.validation.validate_merge`).
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sftkit.validation import check_model_folder, validate_merge

    adapter = Path(adapter)
    torch_dtype = _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in (*_DTYPES.values(),):
        raise SftkitError(f"unknown dtype {dtype!r}.", f"use one of {', '.join(_DTYPES)}.")
    base = os.fspath(base)
    if not Path(base).exists() and (base.startswith((".", "/", "~")) or base.count("/") > 1):
        raise SftkitError(f"base model folder {base!r} does not exist.", "check the path, or pass a Hub id.")
    check_model_folder(base, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SftkitError(
            f"cannot read the base model's config from {base!r}: {exc}", "pass a model folder or Hub id."
        ) from exc
    _adapter_files(adapter)  # fail on a bad adapter folder before the tokenizer or weights are read
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if has_tokenizer else base, trust_remote_code=trust_remote_code
    )
    rows = validate_merge(
        base_config, adapter, adapter_vocab=len(tokenizer) if has_tokenizer else None, allow_pickle=allow_pickle
    )

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch_dtype, use_safetensors=not allow_pickle or None, trust_remote_code=trust_remote_code
    )
    notes = []
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
        notes.append(f"resized the base's embeddings to {rows} rows to match the adapter (new tokens)")
    peft_model = PeftModel.from_pretrained(model, adapter)  # validate_merge refused a pickle adapter above
    peft_model.eval()
    inputs = tokenizer(probe_text, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with_adapter = _logits(peft_model, inputs)
    merged = peft_model.merge_and_unload(safe_merge=True)
    merged_logits = _logits(merged, inputs)
    diff = float((merged_logits - with_adapter).abs().max())
    scale = float(with_adapter.abs().max())
    rtol = MERGE_RTOL.get(merged.dtype, 1e-2)
    if not diff <= rtol * max(scale, 1.0):
        raise SftkitError(
            f"merged logits differ from the adapter's by {diff:.3g} (largest logit {scale:.3g}; allowed "
            f"{rtol:g} of it in {merged.dtype}).",
            "merge in a wider dtype (--dtype fp32) or check that the adapter was trained on this base.",
        )
    return MergeResult(merged, tokenizer, diff, scale, rows, notes)


def model_card(
    *,
    base: str,
    adapter: str,
    adapter_config: dict,
    dtype: str,
    data: dict | str | None = None,
    hyperparameters: dict | None = None,
    metrics: dict | None = None,
    check: dict | None = None,
) -> str:
    """README.md text for a merged model: base, adapter, data, hyperparameters, metrics and how it was made."""
    lora = {
        k: adapter_config.get(k)
        for k in (
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "modules_to_save",
            "use_rslora",
            "use_dora",
        )
        if adapter_config.get(k) not in (None, [], False)
    }
    if isinstance(lora.get("target_modules"), list):
        lora["target_modules"] = sorted(lora["target_modules"])

    def versions() -> str:
        names = ("sftkit", "transformers", "peft", "torch")
        return ", ".join(f"{n} {_version(n)}" for n in names)

    def table(d: dict) -> str:
        rows = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in d.items())
        return "| | |\n|---|---|\n" + rows

    data_text = (
        data
        if isinstance(data, str)
        else (table(data) if data else "Not recorded (no training_info.json next to the adapter).")
    )
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [sftkit, lora, merged]",
        "---",
        "",
        f"# Merged model: {Path(adapter).name} + {base}",
        "",
        "A LoRA adapter merged into its base model (W + scale·BA) with `python -m sftkit merge`. It loads with plain",
        "`AutoModelForCausalLM.from_pretrained(...)`; PEFT is not needed.",
        "",
        "## Base model",
        f"`{base}` (adapter_config.json records `{adapter_config.get('base_model_name_or_path')}`); saved in {dtype}.",
        "",
        "## Adapter",
        f"`{adapter}`",
        "",
        table(lora),
        "",
        "## Data",
        data_text,
        "",
        "## Training hyperparameters",
        table(hyperparameters) if hyperparameters else "Not recorded.",
        "",
        "## Metrics",
        table(metrics) if metrics else "Not recorded.",
        "",
        "## Merge check",
        table(check) if check else "Not run.",
        "",
        "## Made with",
        versions(),
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, text: str) -> None:
    """Write README.md into a (temporary) output folder."""
    (Path(path) / "README.md").write_text(text, encoding="utf-8")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _check_out(out: Path, base: str, adapter: Path, overwrite: bool) -> None:
    """Refuse an output folder that would destroy the inputs or an existing model without --overwrite."""
    out_r = out.resolve()
    for label, path in (("adapter", adapter), ("base model", Path(base))):
        if path.exists():
            p = path.resolve()
            if out_r == p or p in out_r.parents or out_r in p.parents:
                raise SftkitError(
                    f"--out {str(out)!r} overlaps the {label} folder {str(path)!r}; writing there would replace it.",
                    "choose a separate output folder, e.g. outputs/merged.",
                )
    if out.exists() and not out.is_dir():
        raise SftkitError(f"--out {str(out)!r} is a file.", "choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SftkitError(
            f"--out {str(out)!r} already exists and is not empty.",
            "choose a new folder, or pass --overwrite to replace it (the old one stays until the new one is complete).",
        )


def merge_to_folder(
    base: str,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    training_info: str | os.PathLike | None = None,
    verify_reload: bool = True,
    allow_pickle: bool = False,
) -> dict:
    """Merge ``adapter`` into ``base`` and write a complete model folder at ``out`` (atomically); returns a summary."""
    adapter, out = Path(adapter), Path(out)
    _check_out(out, str(base), adapter, overwrite)
    adapter_config, _ = _adapter_files(adapter)
    info_path = Path(training_info) if training_info else adapter / TRAINING_INFO
    info: dict = {}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
    elif training_info:
        raise SftkitError(
            f"--training-info {str(info_path)!r} does not exist.", "pass an existing JSON file."
        )

    result = merge_adapter(base, adapter, dtype=dtype, allow_pickle=allow_pickle)
    model, tokenizer = result.model, result.tokenizer
    check = {
        "probe": "max |logit(merged) - logit(base + adapter)| on a probe sentence",
        "max_abs_logit_diff": float(f"{result.max_abs_logit_diff:.3g}"),
        "max_abs_logit": round(result.max_abs_logit, 3),
        "notes": "; ".join(result.notes) or "none",
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
        tokenizer.save_pretrained(tmp)  # tokenizer files and chat_template.jinja
        if verify_reload:
            check["reload_max_abs_logit_diff"] = _reload_diff(tmp, model, tokenizer)
        card = model_card(
            base=str(base),
            adapter=str(adapter),
            adapter_config=adapter_config,
            dtype=str(model.dtype).replace("torch.", ""),
            data=info.get("data"),
            hyperparameters=info.get("hyperparameters"),
            metrics=info.get("metrics"),
            check=check,
        )
        write_model_card(tmp, card)
    return {"out": str(out), "dtype": str(model.dtype).replace("torch.", ""), **check}


def _reload_diff(folder: Path, model: nn.Module, tokenizer) -> float:
    """Reload the saved folder with plain AutoModelForCausalLM and compare its logits with the merged model's."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype)
    inputs = tokenizer(PROBE_TEXT, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    diff = float((_logits(reloaded, inputs) - _logits(model, inputs)).abs().max())
    if diff != 0.0:
        raise SftkitError(
            f"the saved model reloads with different logits (max diff {diff:.3g}); nothing was written.",
            "please report this with the adapter_config.json; merge in Python and save_pretrained() by hand meanwhile.",
        )
    return diff


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m sftkit merge``."""
    parser.add_argument(
        "--base", required=True, help="base model folder or Hub id the adapter was trained on"
    )
    parser.add_argument(
        "--adapter", required=True, help="LoRA adapter folder (adapter_config.json + weights)"
    )
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(_DTYPES),
        help="dtype of the merged weights; auto keeps the base checkpoint's own (never a quantized one)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    parser.add_argument(
        "--training-info",
        default=None,
        help=f"JSON with data/hyperparameters/metrics for the model card (default: <adapter>/{TRAINING_INFO})",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the saved model to compare logits"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle weights (pytorch_model.bin, adapter_model.bin); unpickling can run arbitrary code",
    )


def run(args: argparse.Namespace) -> int:
    """Run the merge command and print where the model went."""
    summary = merge_to_folder(
        args.base,
        args.adapter,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        training_info=args.training_info,
        verify_reload=not args.no_verify,
        allow_pickle=args.allow_pickle,
    )
    print(json.dumps(summary, indent=2))
    return 0
