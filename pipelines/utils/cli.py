"""What the project's command lines share: bad input as one line on stderr (exit code 2), the last line of
a successful run (``RESULT_JSON: {...}``)."""

from __future__ import annotations

import json
import sys

from pipelines.utils.errors import first_line

RESULT_PREFIX = "RESULT_JSON: "
BAD_INPUT = 2


def bad_input(prog: str, err: BaseException) -> int:
    """Print ``<prog>: error: <first line>`` to stderr; returns the exit code 2."""
    print(f"{prog}: error: {first_line(err)}", file=sys.stderr)
    return BAD_INPUT


def print_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)
