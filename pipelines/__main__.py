"""metaprune COMMAND [flags]: the pipelines' command lines as one installed command.

    metaprune zoo ...         python pipelines/make_zoo.py ...     build a zoo with Ray tasks
    metaprune meta-train ...  python pipelines/meta_train.py ...   meta-train with Ray Train
    metaprune prune ...       python pipelines/prune_batch.py ...  prune many models with Ray tasks
    metaprune tune ...        python pipelines/tune.py ...         search settings with Ray Tune
    metaprune demo            python pipelines/demo.py             the whole pipeline on digits

Each command takes exactly the flags of its script (``metaprune prune --help``); both run the same
``cli`` function.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"zoo": "make_zoo", "meta-train": "meta_train", "prune": "prune_batch", "tune": "tune", "demo": "demo"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"metaprune: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"pipelines.{COMMANDS[command]}")
    sys.argv[0] = f"metaprune {command}"  # argparse's usage line names the command as typed
    (getattr(module, "cli", None) or module.main)(rest)


if __name__ == "__main__":
    main()
