"""A compact "what am I running on" block for the top of every notebook."""

from __future__ import annotations

import platform
from importlib import metadata

import sftkit
from sftkit.device import choose_precision, describe_device

_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


def _version(package: str) -> str:
    # Read installed metadata rather than importing: importing bitsandbytes on a CPU-only
    # machine prints noise, and importing is slower for no benefit here.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def banner() -> str:
    """Return versions of the stack, the device and the precision "auto" would pick."""
    info = describe_device()
    if info["device"] == "cuda":
        device = f"{info['gpu_name']}, {info['gpu_memory_gb']} GB"
    elif info["device"] == "mps":
        device = f"{info['gpu_name']}, {info['cpu_count']} CPU cores"
    else:
        device = f"CPU, {info['cpu_count']} cores"
    versions = [f"{name} {_version(name)}" for name in _PACKAGES]
    lines = [
        f"sftkit {sftkit.__version__} | python {platform.python_version()}",
        " | ".join(versions[:4]),
        " | ".join(versions[4:]),
        f"device: {device} | precision: {choose_precision().name}",
    ]
    return "\n".join(lines)


def print_banner() -> None:
    """Print banner()."""
    print(banner())
