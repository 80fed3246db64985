"""`python -m idanimator <command>`: generate, eval, build-dataset, train, download, convert-checkpoint,
make-tiny, backbones (one module a group of commands, each with its own `add_parser`).

The CLI only parses arguments and translates library errors into one line on stderr and a non-zero
exit status; all the work is in the library.
"""

from __future__ import annotations

import argparse
import sys

from ..console import quiet_libraries, quiet_loading_bars
from ..errors import IDAnimatorError
from . import build_and_train, evaluate, generate, model_files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idanimator",
        description="One face photo and a prompt: a short video of that person (ID-Animator). "
        "Run 'idanimator COMMAND --help' (or 'python -m idanimator COMMAND --help') for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (generate, evaluate, build_and_train, model_files):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        if args.command in {"make-tiny", "convert-checkpoint"}:  # train quiets them after its cheap checks
            quiet_loading_bars()
        return args.run(args)
    except IDAnimatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
