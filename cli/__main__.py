"""tensorps: the admin command line of a tensorps server (`tensorps --help`; exit codes in exits.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from tensorps.cli import bench as _bench  # noqa: F401  (registers its command)
from tensorps.cli import persistence as _persistence  # noqa: F401  (registers its commands)
from tensorps.cli.commands import COMMANDS, Session
from tensorps.cli.exits import INTERRUPTED, OK, USAGE, CommandError, exit_code
from tensorps.cli.options import add_connection_options
from tensorps.cli.output import Output
from tensorps.client import TensorPSError

EPILOG = """\
exit codes: 0 ok; 1 the server refused or failed the call; 2 usage (arguments, local files); 3 not found;
4 unauthenticated or permission denied; 5 unreachable, not serving or timed out; 130 interrupted.

Targets: host:port, or shm:///dev/shm/tensorps-PORT for a server's store on this host (same commands).
"""


class _UsageError(Exception):
    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse that raises on bad usage, so that --json can report it as JSON too (exit 2 either way)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.format_usage(), message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tensorps",
        description="Inspect and operate a tensorps server: list, read and write variables, server stats, "
        "health, a quick benchmark.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_options(p, defaults=True)
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        sub = commands.add_parser(name, help=spec.help, description=spec.help)
        spec.arguments(sub)
        add_connection_options(sub, defaults=False)
    return p


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run one command; returns its exit code (the console script exits with it)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(arguments)
    except _UsageError as exc:
        err = stderr or sys.stderr
        print(f"{exc.usage}tensorps: error: {exc.message}", file=err)
        if "--json" in arguments:
            error = {"code": "USAGE", "message": exc.message, "exit": USAGE}
            print(json.dumps({"error": error}), file=stdout or sys.stdout)
        return USAGE
    out = Output(
        as_json=args.json,
        progress_bars=getattr(args, "progress", None),
        stdout=stdout or sys.stdout,
        stderr=stderr or sys.stderr,
    )
    session = Session(args, out)
    try:
        code = COMMANDS[args.command].run(session)
    except TensorPSError as exc:
        code = exit_code(exc)
        out.error(exc.code.name if code != USAGE else "USAGE", exc.message, code)
    except CommandError as exc:
        code = exc.exit
        out.error(exc.status, exc.message, code)
    except KeyboardInterrupt:
        code = INTERRUPTED
        out.error("INTERRUPTED", "interrupted", code)
    finally:
        session.close()
    return OK if code is None else code


if __name__ == "__main__":
    sys.exit(main())
