"""The command line: a thin shell over the library, ``main(argv) -> exit code``.

``parser.py`` declares the commands and checks every option; ``commands.py`` runs them.
"""

from __future__ import annotations

import sys

from ..errors import CnnmodError
from .commands import COMMANDS
from .parser import build_parser

__all__ = ["build_parser", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error (or --help, --version)
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args)
    except CnnmodError as e:
        print(f"cnnmod: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        return 0
    except KeyboardInterrupt:
        print("cnnmod: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return 130


def run() -> None:
    sys.exit(main())
