"""PNG figures of the evaluation: feature-density histograms and the sparsity/fidelity Pareto plot.

matplotlib runs headless (Agg); every figure is written atomically like every other output.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from pipeline.fileio import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return path


def density_plot(histogram: dict, path: Path, title: str) -> Path:
    """Bar chart of a `metrics.density_histogram` (log10 firing frequency), silent latents noted."""
    edges, counts = histogram["log10_density_edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="#3b6ea8")
    ax.axvline(-1, color="#b33", lw=0.8, ls="--", label="dense (> 10%)")
    ax.set_xlabel("log10 feature density (fraction of tokens on which it fires)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{histogram['silent']} latents never fired (silent)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_plot(rows: list[dict], path: Path) -> Path:
    """L0 against FVU and against CE loss recovered, one point per dictionary.

    rows: [{"label", "l0", "fvu", "ce_loss_score"}]; points on the Pareto front are joined."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, better_low, label in (
        (axes[0], "fvu", True, "FVU (lower is better)"),
        (axes[1], "ce_loss_score", False, "CE loss recovered (higher is better)"),
    ):
        points = sorted((r["l0"], r[key], r["label"]) for r in rows if r.get(key) is not None)
        for l0, value, name in points:
            ax.scatter(l0, value, color="#3b6ea8", s=18)
            ax.annotate(name, (l0, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], None
        for l0, value, _ in points:  # increasing L0: a point is on the front if it beats every sparser one
            if best is None or (value < best if better_low else value > best):
                front.append((l0, value))
                best = value
        if front:
            ax.plot(*zip(*front, strict=True), color="#b33", lw=1, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(rows)} dictionaries", fontsize=9)
    return _save(fig, path)
