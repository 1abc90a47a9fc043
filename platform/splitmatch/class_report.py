"""Per-class evidence for an ablation: every class of a split traced from its causes to its
result, the frozen CLIP's zero-shot accuracy on it, how well pseudo masks find it when it is
unseen (best-match IoU, coverage) and its test IoU in every ablation row."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def per_class_pseudo_quality(candidate_maps: Sequence[Tensor], full_labels: Sequence[Tensor],
                             class_ids: Sequence[int]) -> dict[int, dict]:
    """Per hidden class: mean best-match IoU of its segments with any candidate, and the share of
    its pixels some candidate covers (`kernel.candidate_quality`, one class at a time)."""
    from splitmatch.pseudo.kernel import candidate_quality

    totals = {c: [0, 0.0, 0, 0] for c in class_ids}  # segments, best IoU sum, covered, pixels
    for cmap, label in zip(candidate_maps, full_labels):
        for c in class_ids:
            q = candidate_quality(cmap, label, [c])
            for i, key in enumerate(("segments", "best_iou_sum", "covered_pixels", "unseen_pixels")):
                totals[c][i] += q[key]
    return {c: {"segments": t[0],
                "best_match_iou": t[1] / t[0] if t[0] else math.nan,
                "coverage": t[2] / t[3] if t[3] else math.nan} for c, t in totals.items()}


def clip_zero_shot(cfg) -> dict[str, float] | None:
    """Per-class zero-shot accuracy of the config's CLIP when it is the toy CLIP (measured when it
    was pretrained, on held-out images); None for other CLIPs (no labelled probe set here)."""
    from splitmatch.storage import local_path
    from splitmatch.toyclip import INFO_NAME, checkpoint_info

    if not cfg.clip.pretrained:
        return None
    checkpoint = local_path(cfg.clip.pretrained)  # an s3:// one: the mirror `with_toy_clip` filled
    if not (checkpoint.parent / INFO_NAME).is_file():
        return None
    return checkpoint_info(checkpoint)["zero_shot"]["per_class"]


def pseudo_quality_of_split(cfg, max_images: int = 512) -> dict[str, dict]:
    """Per unseen class of `cfg`'s split: pseudo-mask quality on the cached training candidates."""
    from splitmatch.data import build_dataset
    from splitmatch.pseudo.cache import PseudoMaskCache

    try:
        cache = PseudoMaskCache.open(cfg, cfg.data.train_split)
    except FileNotFoundError:
        return {}
    full_set = build_dataset(cfg.data, cfg.data.train_split, train=False)
    indices = [i for i in range(min(len(full_set), max_images)) if i in cache]
    maps = [cache.get(i)[0] for i in indices]
    labels = [full_set.load(i)["label"] for i in indices]
    unseen = full_set.unseen_ids
    quality = per_class_pseudo_quality(maps, labels, unseen)
    return {full_set.class_names[c]: q for c, q in quality.items()}


def class_report(cfg, per_class_by_row: dict[str, list[dict[str, float]]]) -> dict:
    """Per class of the split: CLIP zero-shot accuracy, pseudo-mask quality (unseen classes) and
    the test IoU of every row (mean over seeds)."""
    from splitmatch.splits import class_names, default_unseen

    names = class_names(cfg.data.dataset)
    unseen = set(cfg.data.unseen if cfg.data.unseen is not None else default_unseen(cfg.data.dataset))
    zero_shot = clip_zero_shot(cfg) or {}
    pseudo = pseudo_quality_of_split(cfg)
    classes = []
    for name in names:
        iou = {}
        for row, runs in per_class_by_row.items():
            values = [r[name] for r in runs if name in r and not math.isnan(r[name])]
            iou[row] = sum(values) / len(values) if values else math.nan
        classes.append({"class": name, "unseen": name in unseen,
                        "clip_zero_shot": zero_shot.get(name, math.nan),
                        "pseudo_best_iou": pseudo.get(name, {}).get("best_match_iou", math.nan),
                        "pseudo_coverage": pseudo.get(name, {}).get("coverage", math.nan),
                        "iou": iou})
    return {"unseen": sorted(unseen), "classes": classes}


def format_class_report(report: dict) -> str:
    rows = list(report["classes"][0]["iou"]) if report["classes"] else []
    head = (f"{'class':<13}{'split':<8}{'CLIP 0-shot':>12}{'pseudo IoU':>11}{'coverage':>9}"
            + "".join(f"{r:>12}" for r in rows))
    lines = [head]

    def cell(value: float, width: int, scale: float = 1.0, digits: int = 2) -> str:
        return f"{'-':>{width}}" if math.isnan(value) else f"{value * scale:>{width}.{digits}f}"

    for c in report["classes"]:
        lines.append(f"{c['class']:<13}{'unseen' if c['unseen'] else 'seen':<8}"
                     f"{cell(c['clip_zero_shot'], 12)}{cell(c['pseudo_best_iou'], 11)}"
                     f"{cell(c['pseudo_coverage'], 9)}"
                     + "".join(cell(c["iou"][r], 12, digits=1) for r in rows))
    return "\n".join(lines)
