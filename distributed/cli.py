"""Command-line entry points: a known error is one line on stderr and an exit code, not a traceback.

    if __name__ == "__main__":
        run_cli(main, "prune_batch", known=(SpecError, ZooFormatError, ...))

Exit codes: 0 done, 1 done but some rows or members failed (the pipeline's ``main`` returns
``{"failed": n}``), 2 a bad input (a known error, or ``SystemExit`` with a message), 3 the output
is in use by another run. Unexpected errors keep their traceback: they are bugs to report.
"""

from __future__ import annotations

import sys
from typing import Callable

from distributed.locks import OutputBusyError

BAD_INPUT, BUSY, SOME_FAILED = 2, 3, 1


def run_cli(main: Callable[..., dict | None], program: str, known: tuple[type[BaseException], ...] = (),
            argv: list[str] | None = None) -> int:
    """Runs ``main(argv)``; exits with the codes above."""
    try:
        result = main(argv)
    except OutputBusyError as err:
        print(f"{program}: {err}", file=sys.stderr)
        raise SystemExit(BUSY) from None
    except (*known, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        print(f"{program}: {one_line(err)}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # SystemExit("message"): a bad input found by the pipeline
            message = exit_.code if exit_.code.startswith(f"{program}:") else f"{program}: {exit_.code}"
            print(message, file=sys.stderr)
            raise SystemExit(BAD_INPUT) from None
        raise
    failed = (result or {}).get("failed", 0) if isinstance(result, dict) else 0
    raise SystemExit(SOME_FAILED if failed else 0)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text or type(err).__name__
