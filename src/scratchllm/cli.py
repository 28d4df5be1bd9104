"""The `scratchllm` command: one entry point, one subcommand table.

Each subcommand lives in `scratchllm.commands.<name>` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`. This module parses, dispatches and maps errors to exit codes:
0 ok, 2 bad input (one line on stderr), 1 internal failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from scratchllm import __version__
from scratchllm.errors import InputError

# name → module. Order is the order `scratchllm --help` lists them.
COMMANDS: dict[str, str] = {
    "quickstart": "scratchllm.commands.quickstart",
    "pretrain": "scratchllm.commands.pretrain",
    "generate": "scratchllm.commands.generate",
    "tokenizer": "scratchllm.commands.tokenizer",
    "convert": "scratchllm.commands.convert",
    "download": "scratchllm.commands.download",
    "finetune": "scratchllm.commands.finetune",
    "classify": "scratchllm.commands.classify",
    "chat": "scratchllm.commands.chat",
    "serve": "scratchllm.commands.serve",
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line message (its default is usage + message)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scratchllm",
        description="Build, pretrain, fine-tune and run GPT-style language models from scratch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"scratchllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"scratchllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scratchllm {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`scratchllm chat ... | head`): stop quietly, as Unix tools do.
        # Later writes (Python's flush at exit) go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    entry()
