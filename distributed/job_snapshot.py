"""A clean snapshot of the code a Ray job needs, to submit as its working directory.

``ray job submit --working-dir .`` hashes the directory twice (once to name the package, once to
upload it); a log or output file that grows inside the repository between the two (``make demo >
demo.log``) gives the worker a package name that was never uploaded ("Failed to download
runtime_env file package gcs://_ray_pkg_..."). A snapshot holds only the named source paths, and
nothing writes to it while the job is submitted.

    SNAP=$(python -m distributed.job_snapshot distributed metanet zoo pipelines pyproject.toml)
    ray job submit --working-dir "$SNAP" -- python pipelines/meta_train.py ...; rm -rf "$SNAP"
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

JOB_SOURCES = ("distributed", "metanet", "zoo", "pipelines", "pyproject.toml")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.log", ".*")


def snapshot(paths: tuple[str, ...] | list[str] = JOB_SOURCES, root: str = ".", dest: str | None = None) -> str:
    """Copies ``paths`` (relative to ``root``) into a new temporary directory; returns it."""
    missing = [p for p in paths if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise FileNotFoundError(f"job snapshot: no such path(s) under {os.path.abspath(root)}: {', '.join(missing)}")
    dest = dest or tempfile.mkdtemp(prefix="metaprune-job-")
    for p in paths:
        src, dst = os.path.join(root, p), os.path.join(dest, p)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=_IGNORE)
        else:
            shutil.copy2(src, dst)
    return dest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=list(JOB_SOURCES), help="files and folders to copy")
    p.add_argument("--root", default=".")
    print(snapshot(p.parse_args(argv).paths, p.parse_args(argv).root))


if __name__ == "__main__":
    main()
