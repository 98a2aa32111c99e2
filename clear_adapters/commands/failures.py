"""How the CLI ends when a command fails: one line on stderr and a status, the traceback only with --debug.

Exit status 2: the input was refused (a library error, a bad value, a file that cannot be written);
1: an unexpected error (a bug: rerun with --debug and report it); 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys
import traceback


def run_command(func, args, *, debug: bool = False) -> int:
    """``func(args)`` as a CLI command: its status, or one line per failure as described above."""
    from ..errors import ClearAdapterError

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        _report(debug, "interrupted")
        return 130
    except (ClearAdapterError, ValueError, OSError) as exc:  # refused input: the message says what to do
        _report(debug, _one_line(exc))
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback is one flag away
        _report(debug, f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        return 1


def _one_line(exc: BaseException) -> str:
    from ..hub import scrub  # a foreign error's text could hold a token; ours never do

    text = " ".join(scrub(str(exc)).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


def _report(debug: bool, message: str) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
