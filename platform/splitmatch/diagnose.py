"""Where a zero-shot result comes from: deeper diagnostics of trained rows (`splitmatch
diagnose`) than an ablation's per-class evidence (`class_report`). `diagnose_split` looks at one
(split, seed) of a finished ablation:
- which query group (seen, candidate, random) wins the pixels of each class at inference, per row;
- the confusion matrix of each row (rows: ground truth, columns: prediction);
- what the candidate targets are made of: background or unseen objects, and how close each
  candidate embedding Cu is to the seen classes' text embeddings;
- the frozen CLIP's own zero-shot confusions (toy CLIP).
The measurement functions are pure PyTorch; the driver functions read caches and checkpoints.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from splitmatch.class_report import per_class_pseudo_quality
from splitmatch.model.segmentor import calibrated_probabilities, mask_probabilities
from splitmatch.targets import centered, embedding_center

GROUPS = ("seen", "candidate", "random")


# ----------------------------------------------------------------------------- pure measurements


def query_groups(num_seen: int, num_candidate: int, num_random: int) -> Tensor:
    """Group id per query in the segmentor's order: 0 seen, 1 candidate, 2 random → [Q]."""
    return torch.cat([torch.full((n,), g, dtype=torch.long)
                      for g, n in enumerate((num_seen, num_candidate, num_random))])


def winning_queries(pred_logits: Tensor, pred_masks: Tensor, output_size: tuple[int, int],
                    seen_class_ids: Sequence[int] | None = None, calibration: float = 0.0
                    ) -> tuple[Tensor, Tensor]:
    """(predicted class [B, H, W], query that contributes most to that class's score [B, H, W]).

    The semantic score of class k at a pixel is sum_q (p[q, k] - calibration if k is seen) * m_q
    (Mask2Former's inference with the run's seen-score calibration, as its figures were scored);
    the pixel "belongs" to the query with the largest term of its winning class's sum.
    """
    probs = calibrated_probabilities(pred_logits.float().sigmoid(), seen_class_ids,
                                     calibration)  # [B, Q, K]
    masks = mask_probabilities(pred_masks.float(), output_size)  # [B, Q, H, W]
    scores = torch.einsum("bqk,bqhw->bkhw", probs, masks)
    pred = scores.argmax(1)  # [B, H, W]
    b, q, h, w = masks.shape
    chosen = torch.gather(probs, 2, pred.view(b, 1, h * w).expand(b, q, h * w))  # [B, Q, H*W]
    owner = (chosen * masks.view(b, q, h * w)).argmax(1).view(b, h, w)
    return pred, owner


# What a query group did with a pixel it won: named its class, named a seen class instead, or
# named an unseen class instead.
NAMINGS = ("right", "as seen", "as unseen")


def naming_counts(owner_group: Tensor, pred: Tensor, target: Tensor, num_classes: int,
                  seen_class_ids: Sequence[int], ignore_index: int = 255) -> Tensor:
    """Pixels of each ground-truth class by the query group that won them and how that group
    named them (NAMINGS) → [num_classes, len(GROUPS), len(NAMINGS)]: where the unseen pixels go
    that the uIoU misses (a candidate query that finds the object but names it as a seen class
    is another fault than a seen query that takes the object)."""
    keep = target != ignore_index
    truth, named, group = target[keep].long(), pred[keep].long(), owner_group[keep].long()
    seen = torch.zeros(num_classes, dtype=torch.bool)
    seen[torch.as_tensor(list(seen_class_ids), dtype=torch.long)] = True
    naming = torch.where(named == truth, 0, torch.where(seen[named], 1, 2))
    index = (truth * len(GROUPS) + group) * len(NAMINGS) + naming
    return torch.bincount(index, minlength=num_classes * len(GROUPS) * len(NAMINGS)).view(
        num_classes, len(GROUPS), len(NAMINGS))


def ownership_counts(owner_group: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = 255) -> Tensor:
    """Pixels of each ground-truth class won by each query group → [num_classes, len(GROUPS)]."""
    keep = target != ignore_index
    index = target[keep].long() * len(GROUPS) + owner_group[keep].long()
    return torch.bincount(index, minlength=num_classes * len(GROUPS)).view(num_classes, len(GROUPS))


def owner_cosines(pred_embeds: Tensor, owner: Tensor, owner_group: Tensor, target: Tensor,
                  class_space: Tensor, group: int = 1, ignore_index: int = 255
                  ) -> tuple[Tensor, Tensor]:
    """For the pixels of each ground-truth class won by a query of `group` (candidate queries by
    default): the sum of the winning query's embedding cosines to every class [num_classes,
    num_classes] and the pixel count [num_classes]. Their ratio says what the queries that find
    a class point at: its own text, or another class's (a hub)."""
    num_classes = class_space.shape[0]
    keep = (target != ignore_index) & (owner_group == group)
    batch = torch.arange(target.shape[0]).view(-1, 1, 1).expand_as(target)[keep]
    embeds = F.normalize(pred_embeds.float(), dim=-1)[batch, owner[keep]]  # [P, C]
    cosines = embeds @ class_space.float().T  # [P, num_classes]
    truth = target[keep].long()
    sums = torch.zeros(num_classes, num_classes).index_add_(0, truth, cosines)
    return sums, torch.bincount(truth, minlength=num_classes)


def candidate_composition(candidate_map: Tensor, full_label: Tensor, num_classes: int,
                          ignore_index: int = 255) -> Tensor:
    """Pixels of each candidate by what they really are: [U, num_classes + 1] counts, the last
    column being background / ignore (the full label, unseen classes visible)."""
    count = int(candidate_map.max())
    if count == 0:
        return torch.zeros(0, num_classes + 1, dtype=torch.long)
    what = full_label.long().clone()
    what[what == ignore_index] = num_classes
    inside = candidate_map > 0
    index = (candidate_map[inside].long() - 1) * (num_classes + 1) + what[inside]
    return torch.bincount(index, minlength=count * (num_classes + 1)).view(count, num_classes + 1)


# ----------------------------------------------------------------------------- deep diagnostics


@torch.no_grad()
def evaluate_rows(cfg, row_checkpoints: dict[str, tuple[object, Path]], clip, classes,
                  log=print) -> dict:
    """Per row: confusion matrix and pixel ownership by query group, on the selection split when
    the config has one (a diagnosis guides method choices, so it should not look at the test
    split), else on the test split."""
    from torch.utils.data import DataLoader

    from splitmatch.data import build_dataset, collate
    from splitmatch.evaluation import ZSSEvaluator
    from splitmatch.model import build_segmentor
    from splitmatch.checkpoints import CALIBRATION, load_state

    val_set = build_dataset(cfg.data, cfg.data.select_split or cfg.data.test_split, train=False)
    text = classes.text
    out = {}
    for row, (row_cfg, checkpoint) in row_checkpoints.items():
        model = build_segmentor(row_cfg.model, embed_dim=text.shape[1])
        state = load_state(checkpoint)
        model.load_state_dict(state["model"])
        model.eval()
        # The value the run chose on val and was scored with (none saved: the config's number).
        calibration = state.get(CALIBRATION, row_cfg.inference.seen_score_calibration)
        calibration = float(calibration) if not isinstance(calibration, str) else 0.0
        num_random = row_cfg.inference.num_random_queries
        groups = query_groups(row_cfg.model.num_seen_queries, row_cfg.model.num_candidate_queries,
                              num_random)
        evaluator = ZSSEvaluator(classes.names, classes.unseen, classes.ignore_index)
        owned = torch.zeros(len(classes.names), len(GROUPS), dtype=torch.long)
        naming = torch.zeros(len(classes.names), len(GROUPS), len(NAMINGS), dtype=torch.long)
        cos_sums = torch.zeros(len(classes.names), len(classes.names))
        cos_counts = torch.zeros(len(classes.names), dtype=torch.long)
        for batch in DataLoader(val_set, batch_size=8, collate_fn=collate):
            space = model.class_space(text, row_cfg.inference.text_center == "vocabulary")
            output = model(batch["image"], space, num_random_queries=num_random)
            pred, owner = winning_queries(output["pred_logits"], output["pred_masks"],
                                          batch["image"].shape[-2:], classes.seen_ids,
                                          calibration)
            evaluator.update(pred, batch["label"])
            owned += ownership_counts(groups[owner], batch["label"], len(classes.names),
                                      classes.ignore_index)
            naming += naming_counts(groups[owner], pred, batch["label"], len(classes.names),
                                    classes.seen_ids, classes.ignore_index)
            sums, counts = owner_cosines(output["pred_embeds"], owner, groups[owner],
                                         batch["label"], space, ignore_index=classes.ignore_index)
            cos_sums += sums
            cos_counts += counts
        result = evaluator.compute()
        out[row] = {"metrics": {k: result[k] for k in ("hIoU", "sIoU", "uIoU")},
                    "calibration": calibration, "per_class": result["per_class"],
                    "confusion": evaluator.confusion.tolist(), "ownership": owned.tolist(),
                    "naming": naming.tolist(),
                    "candidate_query_cosines": (cos_sums / cos_counts.clamp(min=1)[:, None]
                                                ).tolist()}
        log(f"  evaluated {row}: hIoU {result['hIoU']:.2f}  sIoU {result['sIoU']:.2f}  "
            f"uIoU {result['uIoU']:.2f}")
    return out


def candidate_report(cfg, classes, clip, max_images: int = 512) -> dict:
    """What the candidate targets of the training split are (as training reads them), and where
    their Cu point: cosines in the classifier's space (centred with model.center_embeddings)."""
    from splitmatch.data import build_dataset
    from splitmatch.pseudo.training_candidates import training_candidates

    cache = training_candidates(cfg, clip, classes.seen_text)
    full_set = build_dataset(cfg.data, cfg.data.train_split, train=False)
    num_classes = len(classes.names)
    text = F.normalize(classes.text.float(), dim=-1)  # [N, C]
    if cfg.model.center_embeddings:
        text = centered(text, embedding_center(classes.seen_text))
    seen = torch.as_tensor(classes.seen_ids)
    unseen_ids = [k for k in range(num_classes) if k not in set(classes.seen_ids)]
    compositions, cosines, per_image, raw_maps, kept_maps, labels = [], [], [], [], [], []
    for i in range(min(len(full_set), max_images)):
        if i not in cache:
            continue
        cmap, embeds = cache.get(i)
        label = full_set.load(i)["label"]
        raw_maps.append(cache.cache.get(i)[0])
        kept_maps.append(cmap)
        labels.append(label)
        per_image.append(int(embeds.shape[0]))
        if embeds.shape[0] == 0:
            continue
        compositions.append(candidate_composition(cmap, label, num_classes,
                                                  classes.ignore_index))
        cosines.append(F.normalize(embeds.float(), dim=-1) @ text.T)  # [U, N]
    composition = torch.cat(compositions)  # [ΣU, N + 1]
    cosine = torch.cat(cosines)  # [ΣU, N]
    majority = composition.argmax(1)  # class id, or N for background
    nearest = cosine.argmax(1)  # nearest class text over all classes
    seen_cos = cosine[:, seen].max(1).values
    pixels = composition.sum(0)
    kinds = {}
    for kind in sorted(set(majority.tolist())):
        pick = majority == kind
        name = "background" if kind == num_classes else classes.names[kind]
        nearest_names = [classes.names[k] for k in nearest[pick].tolist()]
        counts = {n: nearest_names.count(n) for n in sorted(set(nearest_names))}
        kinds[name] = {
            "candidates": int(pick.sum()),
            "mean_max_cos_to_seen_text": float(seen_cos[pick].mean()),
            "mean_cos_to_own_text": (float(cosine[pick, kind].mean()) if kind < num_classes
                                     else math.nan),
            "nearest_text_is_seen": float(torch.isin(nearest[pick], seen).float().mean()),
            "nearest_text": counts,
        }
    # Whether the unseen objects are among the candidates before and after the background
    # filter: best-match IoU of each object with any candidate, and the share of its pixels
    # some candidate covers.
    raw = per_class_pseudo_quality(raw_maps, labels, unseen_ids)
    kept = per_class_pseudo_quality(kept_maps, labels, unseen_ids)
    counts = torch.tensor(per_image, dtype=torch.float)
    return {"candidates": int(composition.shape[0]),
            "per_image": {"mean": float(counts.mean()), "max": int(counts.max()),
                          "over_queries": float((counts > cfg.model.num_candidate_queries)
                                                .float().mean()),
                          "num_candidate_queries": cfg.model.num_candidate_queries},
            "unseen_found": {classes.names[k]: {"before_filter": raw[k], "after_filter": kept[k]}
                             for k in unseen_ids},
            "background_pixel_share": float(pixels[num_classes] / pixels.sum()),
            "seen_pixel_share": float(pixels[seen].sum() / pixels.sum()),
            "background_candidate_share": float((majority == num_classes).float().mean()),
            "kinds": kinds,
            "text_cos_seen_vs_unseen": _text_similarity(text, classes)}


def _text_similarity(text: Tensor, classes) -> dict:
    """Mean / max cosine between seen and unseen class text embeddings (how close they start)."""
    unseen = [i for i in range(len(classes.names)) if i not in set(classes.seen_ids)]
    block = text[classes.seen_ids] @ text[unseen].T
    return {"mean": float(block.mean()), "max": float(block.max())}


def diagnose_split(cfg, row_checkpoints: dict[str, tuple[object, Path]], log=print) -> dict:
    """Every diagnostic for one split (`cfg.data.unseen`) and its trained rows."""
    from splitmatch.clip import build_clip
    from splitmatch.engine import build_class_space

    clip = build_clip(cfg.clip)
    classes = build_class_space(cfg, clip)
    report = {"unseen": list(classes.unseen), "classes": list(classes.names)}
    report["rows"] = evaluate_rows(cfg, row_checkpoints, clip, classes, log=log)
    report["candidates"] = candidate_report(cfg, classes, clip)
    if cfg.data.dataset == "toyworld":
        from splitmatch.toyclip import zero_shot_report
        report["clip_confusion"] = zero_shot_report(clip)["confusion"]
    return report


def format_diagnosis(report: dict) -> str:
    names = report["classes"]
    unseen = set(report["unseen"])
    out = [f"unseen: {', '.join(report['unseen'])}"]
    for row, r in report["rows"].items():
        m = r["metrics"]
        out.append(f"\n{row}: hIoU {m['hIoU']:.1f}  sIoU {m['sIoU']:.1f}  uIoU {m['uIoU']:.1f}")
        out.append(f"  {'class':<13}{'IoU':>6}  {'won by seen / candidate / random queries':<42}"
                   f"most confused with")
        for k, name in enumerate(names):
            owned = r["ownership"][k]
            total = sum(owned) or 1
            conf = r["confusion"][k]
            pixels = sum(conf) or 1
            wrong = sorted(((v, names[j]) for j, v in enumerate(conf) if j != k), reverse=True)[:2]
            confused = ", ".join(f"{n} {v / pixels:.0%}" for v, n in wrong if v > 0)
            share = " / ".join(f"{v / total:4.0%}" for v in owned)
            mark = "*" if name in unseen else " "
            out.append(f" {mark}{name:<13}{r['per_class'][name]:>6.1f}  {share:<42}{confused}")
        if "naming" in r:
            out.append(f"  unseen pixels, by the group that won them and how it named them "
                       f"({' / '.join(NAMINGS)}; calibration {r['calibration']:g}):")
            for k, name in enumerate(names):
                if name in unseen:
                    out.append(f"   {name:<13}" + "   ".join(
                        _naming_text(group, r["naming"][k][g], sum(map(sum, r["naming"][k])))
                        for g, group in enumerate(GROUPS)))
        if "candidate_query_cosines" in r:
            out.append("  what the candidate queries that win an unseen class's pixels point at "
                       "(mean cosine of their embedding to each class text, top 3):")
            for k, name in enumerate(names):
                if name in unseen and r["ownership"][k][1]:
                    cos = r["candidate_query_cosines"][k]
                    top = sorted(range(len(names)), key=lambda j: -cos[j])[:3]
                    out.append(f"   {name:<13}" + ", ".join(f"{names[j]} {cos[j]:.3f}" for j in top))
    c = report["candidates"]
    out.append(f"\ncandidate targets: {c['candidates']}; background pixels {c['background_pixel_share']:.0%}, "
               f"seen pixels {c['seen_pixel_share']:.1%}; background candidates "
               f"{c['background_candidate_share']:.0%}")
    if "per_image" in c:
        p = c["per_image"]
        out.append(f"  per image: {p['mean']:.1f} on average, at most {p['max']}; more than the "
                   f"{p['num_candidate_queries']} candidate queries in {p['over_queries']:.0%} "
                   f"of the images")
        out.append("  unseen objects among the candidates, best-match IoU / pixels covered, "
                   "before -> after the background filter:")
        for name, found in c["unseen_found"].items():
            before, after = found["before_filter"], found["after_filter"]
            out.append(f"   {name:<13}{before['best_match_iou']:.2f} / {before['coverage']:.0%} -> "
                       f"{after['best_match_iou']:.2f} / {after['coverage']:.0%}")
    out.append(f"  {'majority':<13}{'count':>6}{'max cos seen':>14}{'cos own text':>14}"
               f"{'nearest seen':>14}  nearest text")
    for kind, k in c["kinds"].items():
        top = ", ".join(f"{n} {v}" for n, v in sorted(k["nearest_text"].items(),
                                                      key=lambda kv: -kv[1])[:3])
        own = "-" if math.isnan(k["mean_cos_to_own_text"]) else f"{k['mean_cos_to_own_text']:.3f}"
        out.append(f"  {kind:<13}{k['candidates']:>6}{k['mean_max_cos_to_seen_text']:>14.3f}"
                   f"{own:>14}{k['nearest_text_is_seen']:>14.0%}  {top}")
    t = c["text_cos_seen_vs_unseen"]
    out.append(f"  text embeddings, seen vs unseen classes: mean cos {t['mean']:.3f}, max {t['max']:.3f}")
    if "clip_confusion" in report:
        out.append("\nCLIP zero-shot (held-out single objects): accuracy and top confusions")
        for k, name in enumerate(names):
            row = report["clip_confusion"][k]
            total = sum(row) or 1
            wrong = sorted(((v, names[j]) for j, v in enumerate(row) if j != k), reverse=True)[:2]
            out.append(f"  {name:<13}{row[k] / total:>6.2f}  "
                       + ", ".join(f"{n} {v / total:.2f}" for v, n in wrong if v > 0))
    return "\n".join(out)


def _naming_text(group: str, counts: list[int], total: int) -> str:
    won = sum(counts)
    named = "/".join(f"{c / won:.0%}" for c in counts) if won else "-"
    return f"{group} {won / (total or 1):4.0%} ({named})"


def run_diagnose(cfg, split: str = "dev0", seed: int | None = None, holdout: bool = False,
                 log=print) -> dict:
    """`splitmatch diagnose`: the diagnostics of one (split, seed) of `splitmatch ablation CONFIG`
    (`split`: "dev3", or "holdout0" with `holdout`: diagnosing is choosing, so held-out splits
    are refused without it)."""
    from splitmatch.ablation import ROWS, ablation_splits, on_split, parent_name, row_config
    from splitmatch.config import ConfigError, config_from_dict, resolve_paths, to_dict
    from splitmatch.splits import DEV, HOLDOUT, family_split
    from splitmatch.storage import local_path
    from splitmatch.checkpoints import CheckpointError, check_run_config, result_checkpoint, run_directory

    cfg = resolve_paths(cfg)
    seed = cfg.seed if seed is None else seed
    try:
        chosen = family_split(cfg.data.dataset, split)
    except ValueError as exc:
        raise ConfigError(f"--split {split}: {exc}") from None
    if chosen.family == HOLDOUT and not holdout:
        raise ConfigError(f"--split {split} is a held-out split: diagnosing is choosing, which "
                          f"is done on development splits; pass --holdout to look at it anyway "
                          f"(recorded in the report)")
    if chosen.family == DEV and (cfg.data.unseen is not None or
                                 (cfg.data.dataset == "toyworld" and cfg.data.toyworld.seed)):
        (chosen,) = ablation_splits(cfg, 1, 0)[1]  # the config's own split, as the ablation ran
    base = on_split(cfg, chosen)
    parent = parent_name(cfg, "2", chosen.family)
    rows = {}
    for row in ROWS[:3]:
        row_cfg = row_config(base, row, seed, parent, chosen.label)
        run_dir = run_directory(row_cfg)
        if not run_dir.is_dir():
            continue
        check_run_config(run_dir, row_cfg)
        try:
            rows[row] = (row_cfg, result_checkpoint(run_dir))
        except CheckpointError:  # still training, or stopped before its first checkpoint
            log(f"{row}: no checkpoint in {run_dir} yet, left out")
    if "+SM+MFE" in rows:
        trained_cfg, checkpoint = rows["+SM+MFE"]
        data = to_dict(trained_cfg)
        data["inference"]["num_random_queries"] = cfg.inference.num_random_queries
        rows["+SM+MFE+RQ"] = (config_from_dict(data), checkpoint)
    if not rows:
        raise FileNotFoundError(f"no trained ablation rows for split {chosen.describe()}, seed "
                                f"{seed} under {cfg.train.storage_path}: run splitmatch ablation "
                                f"first")
    report = diagnose_split(base, rows, log=log)
    report["split"] = chosen.label
    report["holdout_flag"] = chosen.family == HOLDOUT
    out = local_path(cfg.train.storage_path) / parent / f"diagnose-{chosen.label}-s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log(format_diagnosis(report))
    log(f"diagnosis written to {out}")
    return report
