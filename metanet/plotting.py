"""Figures for files and MLflow: matplotlib's pyplot on the file-only Agg backend (no display on
Ray workers or CI), set in one place."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def selection_figure(epochs, scores, chosen: int, title: str):
    """Checkpoint selection: each kept checkpoint's validation score (%) against its epoch."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot(epochs, [100 * s for s in scores], marker="o")
    ax.axvline(chosen, color="tab:red", ls="--", label="chosen")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation score (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


DIAGNOSTIC_PANELS = [("val_auc", "curve area (%)", 100), ("val_ratio_spread", "ratio spread", 1),
                     ("val_share_below_0.1", "channels below 0.1 (%)", 100), ("val_acc_recal", "acc after recal (%)", 100)]


def diagnostics_figure(history: dict[str, list[tuple[int, float]]]):
    """The validation diagnostics of every epoch (``{metric: [(epoch, value), ...]}``, the keys of
    ``DIAGNOSTIC_PANELS``) side by side; None when nothing was diagnosed."""
    if not any(history.get(k) for k, _, _ in DIAGNOSTIC_PANELS):
        return None
    fig, axes = pyplot().subplots(1, len(DIAGNOSTIC_PANELS), figsize=(15, 3.4))
    for ax, (key, title, scale) in zip(axes, DIAGNOSTIC_PANELS):
        points = sorted(history.get(key, []))
        ax.plot([s + 1 for s, _ in points], [scale * v for _, v in points], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epochs done")
        ax.grid(alpha=0.3)
    fig.suptitle("validation members: the edit's diagnostics during meta-training")
    fig.tight_layout()
    return fig
