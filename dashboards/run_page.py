"""One finished training run as one self-contained HTML page: its figures, the per-class IoU of seen
and unseen classes, the prediction pictures, a few pseudo-mask examples with the class each
candidate's CLIP embedding is nearest to, and the training curves.

`train` (and so the demo) writes it next to the run as `report.html` and logs it to the run's
MLflow run (tag `splitmatch.page` = where it was written), where `compare` links to it. Everything
is read back from MLflow and the pseudo-mask cache, so the page shows what was recorded.
"""
from __future__ import annotations

import base64
import html
import io
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from splitmatch.config import Config, redact  # noqa: E402
from splitmatch.dashboards.report import CSS  # noqa: E402
from splitmatch.dashboards.runs import make_client  # noqa: E402
from splitmatch.files import write_atomic  # noqa: E402

PAGE_NAME = "report.html"
PAGE_TAG = "splitmatch.page"
METRICS = ("hIoU", "sIoU", "uIoU", "mIoU")

# Loads decoded images only: the page says so on its <body>, for a headless browser to read.
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesLoaded = String(images.length > 0 &&
      images.every((img) => img.complete && img.naturalWidth > 0));
});
</script>"""


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def training_curves(history: dict[str, list[tuple[int, float]]]) -> str | None:
    """Loss, and hIoU on the selection split (and the test figure at the end), per iteration."""
    if not history.get("loss"):
        return None
    fig = Figure(figsize=(12, 4), layout="constrained")
    loss_ax, iou_ax = fig.subplots(1, 2)
    loss_ax.plot(*zip(*history["loss"]), linewidth=1.2)
    loss_ax.set(title="training loss", xlabel="iteration")
    for key, label, style in (("select_hIoU", "hIoU on the selection split", "o-"),
                              ("hIoU", "hIoU on the test split (reported)", "s")):
        points = [(s, v) for s, v in history.get(key, []) if not math.isnan(v)]
        if points:
            iou_ax.plot(*zip(*points), style, label=label)
    iou_ax.set(title="hIoU %", xlabel="iteration")
    if iou_ax.lines:
        iou_ax.legend(frameon=False)
    return _png(fig)


def pseudo_mask_examples(cfg: Config, count: int = 3) -> list[tuple[str, list[str]]]:
    """(PNG, one line per candidate) for the first `count` training images with candidates: the
    image, and each candidate mask labelled with the class whose CLIP text embedding its CLS
    embedding is nearest to (all class names: this is a picture for people, not training)."""
    import torch.nn.functional as F

    from splitmatch.clip import TEMPLATES, build_clip
    from splitmatch.data import build_dataset
    from splitmatch.pseudo.cache import PseudoMaskCache
    from splitmatch.splits import class_names
    from splitmatch.visualize import class_colors

    if cfg.matching.mode != "split":
        return []
    cache = PseudoMaskCache.open(cfg, cfg.data.train_split)
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=False)
    names = class_names(cfg.data.dataset)
    text = build_clip(cfg.clip).text_embeddings(names, TEMPLATES[cfg.clip.templates]).float()
    colors = class_colors(16)
    examples = []
    for index in range(len(dataset)):
        if len(examples) == count:
            break
        if index not in cache:
            continue
        cmap, embeds = cache.get(index)
        if embeds.shape[0] == 0:
            continue
        image = dataset[index]["image"]
        cmap = F.interpolate(cmap[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0]
        cmap = cmap.long().numpy()
        similarity = F.normalize(embeds.float(), dim=-1) @ F.normalize(text, dim=-1).T
        best = similarity.max(dim=1)
        fig = Figure(figsize=(8, 4), layout="constrained")
        left, right = fig.subplots(1, 2)
        picture = image.permute(1, 2, 0).numpy()
        left.imshow(picture)
        left.set_title(f"training image {index}")
        overlay = np.zeros(cmap.shape + (4,))
        lines = []
        for k in range(embeds.shape[0]):
            overlay[cmap == k] = (*colors[k % len(colors)], 0.7)
            lines.append(f"candidate {k}: nearest class {names[best.indices[k]]} "
                         f"(cosine {best.values[k]:.2f}, {int((cmap == k).sum())} pixels)")
        right.imshow(picture)
        right.imshow(overlay)
        right.set_title(f"{embeds.shape[0]} candidate(s) in unannotated regions")
        for ax in (left, right):
            ax.set_xticks([]), ax.set_yticks([])
        examples.append((_png(fig), lines))
    return examples


def render(name: str, run, history: dict, predictions: list[Path],
           pseudo: list[tuple[str, list[str]]], tracking_uri: str) -> str:
    metrics, tags = run.data.metrics, run.data.tags
    unseen = set(filter(None, tags.get("unseen", "").split(",")))
    headline = "".join(
        f"<dt>{k} %</dt><dd>{metrics[k]:.2f}</dd>" for k in METRICS if k in metrics)
    rows = sorted(((key[len("IoU/"):], value) for key, value in metrics.items()
                   if key.startswith("IoU/")), key=lambda item: (item[0] not in unseen, item[0]))
    table = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{'unseen' if name in unseen else 'seen'}</td>"
        f'<td class="num">{value:.2f}</td></tr>' for name, value in rows)
    curves = training_curves(history)
    sections = [
        "<h2>Per-class IoU on the test split</h2>" + (
            '<div class="table-wrap"><table class="runs"><thead><tr><th>class</th><th>split</th>'
            f"<th>IoU %</th></tr></thead><tbody>{table}</tbody></table></div>" if rows else
            '<p class="note">No per-class IoU was logged.</p>'),
        "<h2>Training curves</h2>" + (f"<figure>{_img(curves, 'training curves')}</figure>"
                                      if curves else '<p class="note">No loss was logged.</p>'),
        "<h2>Predictions on test images</h2>" + ("".join(
            f"<figure>{_img(base64.b64encode(p.read_bytes()).decode('ascii'), p.name)}"
            f"<figcaption>{html.escape(p.name)}: image, ground truth, prediction, and the pixels "
            f"each candidate query wins</figcaption></figure>" for p in predictions)
            or '<p class="note">No prediction pictures were logged '
               '(train.num_visualizations is 0).</p>'),
        "<h2>Pseudo masks of unseen candidates</h2>" + ("".join(
            f"<figure>{_img(png, 'pseudo masks')}<figcaption>"
            + "<br>".join(html.escape(line) for line in lines) + "</figcaption></figure>"
            for png, lines in pseudo) or '<p class="note">This run used no pseudo masks '
                                         '(matching.mode is not "split").</p>'),
    ]
    scope = [("run", f"{run.info.run_name} ({run.info.run_id})"), ("status", run.info.status),
             ("MLflow store", redact(tracking_uri)), ("dataset", tags.get("dataset", "?")),
             ("splits train / select / test", tags.get("split", "?")),
             ("unseen classes", ", ".join(sorted(unseen)) or "?"),
             ("matching", tags.get("matching", "?")),
             ("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))]
    scope_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                         for k, v in scope)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>splitmatch run {html.escape(run.info.run_name or run.info.run_id)}</title>
<style>{CSS}</style>{CHECK_IMAGES}</head>
<body>
<h1>splitmatch run {html.escape(name)}</h1>
<dl class="scope">{scope_html}</dl>
<h2>Test split</h2><dl class="scope">{headline}</dl>
{"".join(sections)}
</body></html>
"""


def write_run_page(cfg: Config, tracking_uri: str, run_id: str, out_dir: Path) -> Path:
    """Write `out_dir/report.html` for the MLflow run `run_id`, log it to the run, return its path."""
    client = make_client(tracking_uri)
    run = client.get_run(run_id)
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in ("loss", "select_hIoU", "hIoU")}
    with tempfile.TemporaryDirectory() as tmp:
        predictions = []
        if any(a.path == "predictions" for a in client.list_artifacts(run_id)):
            folder = Path(client.download_artifacts(run_id, "predictions", tmp))
            predictions = sorted(folder.glob("*.png"))
        page = render(cfg.name, run, history, predictions, pseudo_mask_examples(cfg), tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_atomic(out_dir / PAGE_NAME, lambda handle: handle.write(page.encode("utf-8")))
    client.log_artifact(run_id, str(path))
    client.set_tag(run_id, PAGE_TAG, str(path))
    return path
