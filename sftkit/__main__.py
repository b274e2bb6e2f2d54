"""Command line: ``python -m sftkit <command> [arguments]``.

A command is a module with either ``main(argv) -> int`` or ``add_arguments(parser)`` plus ``run(args) -> int``.
Add one by adding a line to COMMANDS; modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sftkit.errors import SftkitError

# name -> (module that runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sftkit.recipe", "train from a YAML recipe plus overrides (python -m sftkit train --config FILE)"),
    "merge": ("sftkit.merge", "merge a LoRA adapter into its base model and save a plain transformers model"),
    "resume-demo": ("sftkit.resume", "the small checkpointing LoRA run of notebook 12 (losses to losses.jsonl)"),
}


def _usage() -> str:
    lines = ["usage: python -m sftkit <command> [arguments]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m sftkit <command> --help` lists a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command named by the first argument; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m sftkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "main"):
        return int(module.main(rest) or 0)
    parser = argparse.ArgumentParser(prog=f"python -m sftkit {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except SftkitError as err:  # a clear problem-and-fix message instead of a traceback
        print(f"error: {err.problem}\nfix: {err.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
