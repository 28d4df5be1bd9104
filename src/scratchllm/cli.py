"""The `scratchllm` command: one entry point, one subcommand table.

Each subcommand lives in `scratchllm.commands.<name>` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`. This module parses, dispatches and maps errors to exit codes:
0 ok, 2 bad input (one line on stderr), 1 internal failure or a full disk, 130 interrupted.
An `InputError` and an OSError about a file (`os_error_message`) are one line each; an
argument that is not UTF-8 text is refused before the command runs (`check_text_arguments`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
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
    "data": "scratchllm.commands.data",
    "convert": "scratchllm.commands.convert",
    "download": "scratchllm.commands.download",
    "finetune": "scratchllm.commands.finetune",
    "classify": "scratchllm.commands.classify",
    "chat": "scratchllm.commands.chat",
    "serve": "scratchllm.commands.serve",
    "evaluate": "scratchllm.commands.evaluate",
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
        check_text_arguments(parser, args)
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"scratchllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        mapped = os_error_message(exc, parser, args)
        if mapped is None:  # no file named (a broken pipe, a socket): not the user's input
            raise
        code, message = mapped
        logging.getLogger("scratchllm").debug("%s", message, exc_info=True)  # -v: the traceback
        print(f"scratchllm {args.command}: error: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"scratchllm {args.command}: interrupted", file=sys.stderr)
        return 130


def _flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """dest → how the command line spells it (`--out`, `TEXT`), for the chosen (sub)commands.
    argparse keeps its actions in `_actions` (no public accessor)."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                names.update(_flags(chosen, args))
        elif action.option_strings:
            names[action.dest] = max(action.option_strings, key=len)
        else:
            names[action.dest] = str(action.metavar or action.dest)
    return names


def _values(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(dest, text) of every string argument given (a list's items one by one)."""
    out = []
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, str) and not dest.startswith("_") and dest != "command":
                out.append((dest, item))
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An argument with bytes that are not UTF-8 (argv carries them as lone surrogates) is
    refused, naming it, unless it names an existing file: text must be text, a path need not."""
    for dest, text in _values(args):
        m = _SURROGATE.search(text)
        if m is None or os.path.lexists(text):
            continue
        code = ord(m.group())
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        flag = _flags(parser, args).get(dest, dest)
        raise InputError(
            f"{flag}: not valid UTF-8 text ({what} at character {m.start()}); expected UTF-8"
        )


def os_error_message(
    exc: OSError, parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[int, str] | None:
    """(exit code, one line) for an OSError about a file: a full disk (or quota) is exit 1,
    "cannot write PATH: no space left on device"; anything else naming a file (read-only,
    permission denied, a file where a folder is wanted, ...) is exit 2, naming the argument
    the path came from. None when the error names no file (a broken pipe, say)."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if exc.filename is None and not full:
        return None
    reason = (exc.strerror or str(exc)).lower()
    verb = "cannot write " if full or exc.errno == errno.EROFS else ""
    code = 1 if full or exc.errno == errno.EIO else 2
    if exc.filename is None:  # a write with no name on it: what the command was writing
        out = getattr(args, "out", None)
        return code, f"{verb}{out if isinstance(out, str) else 'a file'}: {reason}"
    path = os.fsdecode(exc.filename)
    given = _argument_holding(path, parser, args)
    if given is None:
        return code, f"{verb}{path}: {reason}"
    flag, value = given
    if os.path.abspath(value) == os.path.abspath(path):
        return code, f"{flag} {value}: {'cannot write it: ' if verb else ''}{reason}"
    return code, f"{flag} {value}: {verb}{path}: {reason}"


def _argument_holding(
    path: str, parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str, str] | None:
    """(flag, value) of the argument that is `path`, or the closest folder above it, or else
    one inside it (`--out ro/a/run` when making `ro/a` failed)."""
    target = os.path.abspath(path)
    above: list[tuple[int, str, str]] = []  # (length, dest, value)
    below: list[tuple[int, str, str]] = []
    for dest, value in _values(args):
        if not value.strip() or "\n" in value:  # text, not a path
            continue
        base = os.path.abspath(value)
        common = os.path.commonpath([base, target])
        if common == base:
            above.append((len(base), dest, value))
        elif common == target:
            below.append((-len(base), dest, value))
    found = max(above) if above else max(below) if below else None
    if found is None:
        return None
    return _flags(parser, args).get(found[1], found[1]), found[2]


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
