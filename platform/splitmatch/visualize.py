"""Prediction pictures for MLflow: image, ground truth, prediction, and what candidate queries claim."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


def class_colors(num_classes: int) -> np.ndarray:
    """Distinct, stable colours per class id [N, 3] in 0..1 (tab20, then golden-ratio hues)."""
    base = plt.get_cmap("tab20")(np.arange(20))[:, :3]
    if num_classes <= 20:
        return base[:num_classes]
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    return matplotlib.colors.hsv_to_rgb(np.stack([hues, np.full_like(hues, 0.65),
                                                  np.full_like(hues, 0.9)], axis=1))


def _paint(label: np.ndarray, colors: np.ndarray, ignore_index: int) -> np.ndarray:
    out = np.full(label.shape + (3,), 0.15)  # ignore pixels: dark grey
    valid = label != ignore_index
    out[valid] = colors[label[valid]]
    return out


def prediction_figure(image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor,
                      candidate_owner: torch.Tensor, class_names: Sequence[str],
                      unseen: Sequence[str], ignore_index: int = 255):
    """One row: image | ground truth | prediction | candidate-query masks.

    image uint8 [3, H, W]; target / pred [H, W] class ids; candidate_owner [H, W]: the index of the
    candidate query whose mask wins the pixel (−1 where a seen or random query wins).
    """
    colors = class_colors(len(class_names))
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.8), constrained_layout=True)
    axes[0].imshow(image.permute(1, 2, 0).cpu().numpy())
    axes[0].set_title("image")
    axes[1].imshow(_paint(target.cpu().numpy(), colors, ignore_index))
    axes[1].set_title("ground truth")
    axes[2].imshow(_paint(pred.cpu().numpy(), colors, ignore_index))
    axes[2].set_title("prediction")
    owner = candidate_owner.cpu().numpy()
    cmap = ListedColormap(plt.get_cmap("tab10")(np.arange(10))[:, :3])
    shown = np.ma.masked_where(owner < 0, owner % 10)
    axes[3].imshow(image.permute(1, 2, 0).cpu().numpy(), alpha=0.35)
    axes[3].imshow(shown, cmap=cmap, vmin=0, vmax=9, alpha=0.75, interpolation="nearest")
    axes[3].set_title(f"candidate queries ({len(np.unique(owner[owner >= 0]))} active)")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    present = sorted((set(np.unique(target.cpu().numpy())) | set(np.unique(pred.cpu().numpy())))
                     - {ignore_index})
    handles = [Patch(color=colors[c], label=class_names[c] + (" (unseen)" if class_names[c] in unseen
                                                               else "")) for c in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, max(1, len(handles))),
               fontsize=8, frameon=False)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
