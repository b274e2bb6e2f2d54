"""configs/accelerate/*.yaml: each loads with accelerate's own classes, every key means something to accelerate,
and the launcher turns it into the engine the file's name promises.

accelerate silently ignores an unknown key inside `deepspeed_config:` or `fsdp_config:` (it copies each onto its
launch arguments with setattr), so a typo there would pass `ClusterConfig.from_yaml_file`. We therefore check
each nested key against the argument names of accelerate's own `launch` parser, then run the launcher's own
environment preparation and build the real FSDP / DeepSpeed plugin objects from that environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import (
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
    prepare_simple_launcher_cmd_env,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
IDS = [p.stem for p in CONFIGS]

# What each file must turn into: (engine, ZeRO stage, optimizer offload, parameter offload)
EXPECTED = {
    "single_gpu": ("single", None, None, None),
    "ddp": ("ddp", None, None, None),
    "zero1": ("deepspeed", "1", "none", "none"),
    "zero2": ("deepspeed", "2", "none", "none"),
    "zero3": ("deepspeed", "3", "none", "none"),
    "zero2_offload": ("deepspeed", "2", "cpu", "none"),
    "zero3_offload": ("deepspeed", "3", "cpu", "cpu"),
    "fsdp2": ("fsdp", None, None, None),
}


def _launch_env(path: Path) -> tuple[object, dict]:
    """What `accelerate launch --config_file path train.py` would put in the training processes' environment."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def test_every_strategy_has_a_config():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_loads_with_accelerate(path: Path):
    config = ClusterConfig.from_yaml_file(path)  # raises on unknown top-level keys
    assert config.compute_environment.value == "LOCAL_MACHINE"
    # precision belongs to the recipe: a bf16 here would override fp32 on CPU / fp16 on older GPUs
    assert config.mixed_precision == "no"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_nested_keys_are_accelerate_launch_arguments(path: Path):
    dests = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    unknown = []
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in (raw.get(section) or {}).keys():
            name = key if key.startswith(prefix) else prefix + key  # accelerate's own renaming rule
            if name not in dests:
                unknown.append(f"{section}.{key}")
    assert not unknown, f"{path.name}: accelerate would silently ignore {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_launcher_builds_the_promised_engine(path: Path):
    args, env = _launch_env(path)
    engine, stage, offload_opt, offload_param = EXPECTED[path.stem]
    is_ds = env.get("ACCELERATE_USE_DEEPSPEED") == "true"
    is_fsdp = env.get("ACCELERATE_USE_FSDP") == "true"
    got = "deepspeed" if is_ds else "fsdp" if is_fsdp else "ddp" if args.multi_gpu else "single"
    assert got == engine
    if engine != "single":
        assert (
            args.num_processes == 2
        )  # the two-GPU machine this project measures on; override with --num_processes
    if engine == "deepspeed":
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
        assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == offload_opt
        assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == offload_param
        # left to the recipe ("auto"), so accelerate and the Trainer can never disagree
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    if engine == "fsdp":
        assert env["FSDP_VERSION"] == "2"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


def test_fsdp2_plugin_accepts_the_config():
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, env = _launch_env(CONFIG_DIR / "fsdp2.yaml")
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()  # reads and validates the FSDP_* variables
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def _device(offload) -> str:
    device = getattr(offload, "device", "none") if offload is not None else "none"
    return str(getattr(device, "value", device))  # an enum or, with use_enum_values, its string


DEEPSPEED_CONFIGS = [p for p in CONFIGS if p.stem.startswith("zero")]


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=[p.stem for p in DEEPSPEED_CONFIGS])
def test_deepspeed_accepts_the_generated_config(path: Path):
    # Needs the deepspeed package (not a project dependency: it is a source-only release that compiles against the
    # local torch). It validates the zero_optimization section accelerate generates against DeepSpeed's own
    # pydantic schema, which forbids unknown fields.
    pytest.importorskip(
        "deepspeed", reason="deepspeed not installed: `pip install deepspeed` to run this check"
    )
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    _, env = _launch_env(path)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = DeepSpeedZeroConfig(**plugin.deepspeed_config["zero_optimization"])
    _, stage, offload_opt, offload_param = EXPECTED[path.stem]
    assert int(zero.stage) == int(stage)
    assert _device(zero.offload_optimizer) == offload_opt
    assert _device(zero.offload_param) == offload_param
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_header_shows_a_working_launch_command(path: Path):
    text = path.read_text()
    commands = re.findall(r"accelerate launch --config_file (\S+).*?--config (\S+)", text)
    assert commands, f"{path.name}: no example launch command in its comments"
    for config_file, recipe in commands:
        assert (REPO / config_file).is_file() and (REPO / recipe).is_file(), (config_file, recipe)
        assert Path(config_file).name == path.name
