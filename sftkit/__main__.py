"""``python -m sftkit <command> ...``: the project's command line.

Each command lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``.
Add a command by adding a line to COMMANDS; modules are imported only when their command runs, so
``python -m sftkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sftkit.errors import SftkitError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("sftkit.merge", "merge a LoRA adapter into its base model and save a plain transformers model"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    """The top-level parser; only the chosen command's module is imported (returned, or None)."""
    parser = argparse.ArgumentParser(prog="python -m sftkit", description="sftkit command line")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(cmd)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the command; a SftkitError prints its problem and fix and exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except SftkitError as err:
        print(f"error: {err.problem}\nfix: {err.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
