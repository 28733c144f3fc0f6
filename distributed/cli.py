"""Command-line entry points: a known error is one line on stderr and an exit code, not a traceback.

    if __name__ == "__main__":
        run_cli(main, "prune_batch", known=(SpecError, ZooFormatError, ...))

Exit codes: 0 done, 1 done but some rows or members failed (the pipeline's ``main`` returns
``{"failed": n}``), 2 a bad input (a known error, or ``SystemExit`` with a message), 3 the output
is in use by another run, 4 an I/O failure (a full disk, a read-only filesystem, a failing
device: one line naming the path; what was written before stays, and the same command resumes).
Unexpected errors keep their traceback: they are bugs to report.
"""

from __future__ import annotations

import errno
import re
import sys
from typing import Callable

from distributed.locks import OutputBusyError

BAD_INPUT, BUSY, SOME_FAILED, IO_FAILURE = 2, 3, 1, 4
# errors of the machine, not of the input: the disk is full or read-only, the device fails
IO_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO}


def run_cli(main: Callable[..., dict | None], program: str, known: tuple[type[BaseException], ...] = (),
            argv: list[str] | None = None) -> int:
    """Runs ``main(argv)``; exits with the codes above."""
    try:
        result = main(argv)
    except OutputBusyError as err:
        print(f"{program}: {err}", file=sys.stderr)
        raise SystemExit(BUSY) from None
    except (*known, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as err:
        print(f"{program}: {one_line(err)}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None
    except OSError as err:
        if _errno(err) not in IO_ERRNOS:
            raise
        print(f"{program}: {one_line(err)} (an I/O failure: free space or make the output writable; the same "
              "command resumes)", file=sys.stderr)
        raise SystemExit(IO_FAILURE) from None
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # SystemExit("message"): a bad input found by the pipeline
            message = exit_.code if exit_.code.startswith(f"{program}:") else f"{program}: {exit_.code}"
            print(message, file=sys.stderr)
            raise SystemExit(BAD_INPUT) from None
        raise
    failed = (result or {}).get("failed", 0) if isinstance(result, dict) else 0
    raise SystemExit(SOME_FAILED if failed else 0)


def _errno(err: OSError) -> int | None:
    """The error's errno; pyarrow's OSErrors carry it only in their text ("[Errno 28] ...")."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"\[Errno (\d+)\]", str(err))
    return int(found.group(1)) if found else None


# the colour codes Ray puts in its tracebacks' headers (and a terminal would show, a log file not)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def training_error(err: BaseException | str) -> str:
    """The first line that says what went wrong in a Ray Train or Tune error (its message wraps each
    worker's whole traceback): the last ``Error:`` line of the first worker's traceback, without
    Ray's colour codes."""
    lines = [line.strip() for line in ANSI.sub("", str(err)).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line)]
    return (causes[-1] if causes else lines[0] if lines else type(err).__name__)[:300]


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and err.filename and err.strerror:  # "path: No space left on device"
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text or type(err).__name__
