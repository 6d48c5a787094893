"""What the project's command lines share: bad input as one line on stderr (exit code 2), from argparse
too (:class:`Parser`), a run that could not go on as one line (exit code 1), and the last line of a
successful run (``RESULT_JSON: {...}``).

Every command (``pipelines/*.py``, ``tuning/sweep_lambdas.py``) is a thin ``main(argv) -> exit code`` over a
library function, and runs as ``python pipelines/<command>.py`` from a checkout: its first lines put the
repository on ``sys.path`` when it is run as a script (``__package__`` empty), before any project import.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.utils.errors import first_line

RESULT_PREFIX = "RESULT_JSON: "
BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line ``<prog>: error: <message>`` (no usage dump),
    exit code 2."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message}\n")


def bad_input(prog: str, err: BaseException) -> int:
    """Print ``<prog>: error: <first line>`` to stderr; returns the exit code 2."""
    print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
    return BAD_INPUT


def failed(prog: str, err: BaseException) -> int:
    """Print ``<prog>: <first line>`` to stderr for a run that could not go on (not bad input); returns 1."""
    print(f"{prog}: {first_line(err)}", file=sys.stderr)
    return 1


def print_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)
