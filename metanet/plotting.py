"""Figures for files and MLflow: matplotlib's pyplot on the file-only Agg backend (no display on
Ray workers or CI), set in one place."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
