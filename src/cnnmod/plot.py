"""``evaluate --plot``: per-class accuracy and the confusion matrix in one PNG (matplotlib, optional)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import CnnmodError
from .files import atomic_write_bytes, refuse_unless_ours

SOFTWARE = "cnnmod"  # written into the PNG's text chunk, so that cnnmod knows which PNGs it may replace


def _drawn_by_cnnmod(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == SOFTWARE
    except (UnidentifiedImageError, OSError):
        return False


def _pyplot(path: Path):
    """matplotlib's pyplot, drawing to files only, once ``path`` is known to be a PNG cnnmod may write."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise CnnmodError("expected matplotlib for --plot, found it missing; install it "
                          "(pip install matplotlib, or cnnmod[plot]).") from None
    if path.suffix.lower() != ".png":
        raise CnnmodError(f"{path}: expected a .png file name for --plot, found {path.suffix or 'no suffix'}.")
    refuse_unless_ours(path, _drawn_by_cnnmod, "a plot cnnmod drew")
    return plt


def _write(plt, fig, path: Path) -> None:
    try:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": SOFTWARE})
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_overlap(names: list[str], matrix, path: str | os.PathLike, *, title: str = "") -> None:
    """Draw the modules' overlap matrix (Jaccard index of their kept kernels) into the PNG ``path``."""
    path = Path(path)
    plt = _pyplot(path)
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * k + 3), max(4, 0.35 * k + 2)))
    try:
        shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        fig.colorbar(shown, ax=ax, label="Jaccard index of kept kernels")
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{float(matrix[i][j]):.2f}", ha="center", va="center", fontsize=7,
                            color="white" if float(matrix[i][j]) > 0.5 else "black")
        ax.set_title(title or "module overlap", fontsize=9)
    except Exception:
        plt.close(fig)
        raise
    _write(plt, fig, path)


def plot_evaluation(result: dict, path: str | os.PathLike, *, title: str = "") -> None:
    """Draw ``result`` (from ``evaluate_scores(..., confusion=True)``) into the PNG ``path``."""
    path = Path(path)
    plt = _pyplot(path)
    names = list(result["per_class"])
    conf = result["confusion"]
    k = len(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.5 * k + 6), max(4, 0.35 * k + 2)))
    try:
        left.barh(range(k), [result["per_class"][n] for n in names], color="#4878a8")
        left.set_yticks(range(k), names)
        left.invert_yaxis()
        left.set_xlim(0, 1)
        left.set_xlabel("accuracy")
        left.set_title(f"per class (top-1 {result['top1']:.4f}, n={result['n']})")
        counts = conf["matrix"]
        shares = [[v / max(1, sum(row)) for v in row] for row in counts]  # each true class's row sums to 1
        right.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        right.set_xticks(range(len(conf["predicted"])), conf["predicted"], rotation=90)
        right.set_yticks(range(len(conf["true"])), conf["true"])
        right.set_xlabel("answer")
        right.set_ylabel("true class")
        right.set_title("confusion (share of each true class)")
        if len(conf["true"]) * len(conf["predicted"]) <= 400:  # numbers stay readable up to 20 x 20
            for i, row in enumerate(counts):
                for j, v in enumerate(row):
                    if v:
                        right.text(j, i, str(v), ha="center", va="center", fontsize=7,
                                   color="white" if shares[i][j] > 0.5 else "black")
        if title:
            fig.suptitle(title, fontsize=9)
    except Exception:
        plt.close(fig)
        raise
    _write(plt, fig, path)
