"""Command line: ``python -m sftkit <command> [arguments]``; each command is a module with a ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "sftkit.recipe",
        "train from a YAML recipe plus overrides (python -m sftkit train --config FILE)",
    ),
}


def _usage() -> str:
    lines = ["usage: python -m sftkit <command> [arguments]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
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
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
