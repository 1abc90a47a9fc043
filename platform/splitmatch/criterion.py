"""All training losses of Split Matching (paper Sec. 3.2-3.4).

L = L_match + L_cos + L_MFE with L_match = focal classification + (IoU + dice) mask losses over the
assignment σ*; deep supervision repeats L_match and L_cos on every intermediate decoder prediction.
The criterion consumes the model's output dict, the targets of `targets.build_targets` and the
matcher's index pairs; it never looks at the model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from splitmatch.matcher import Match, point_sample


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017), same shape as `logits`."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice loss per mask: inputs [N, P] logits, targets [N, P] → [N]."""
    probs = inputs.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    return 1 - (numerator + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def iou_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """Soft IoU (Jaccard) loss per mask: inputs [N, P] logits, targets [N, P] → [N]."""
    probs = inputs.sigmoid()
    intersection = (probs * targets).sum(-1)
    union = probs.sum(-1) + targets.sum(-1) - intersection
    return 1 - (intersection + 1) / (union + 1)


def uncertain_point_coords(mask_logits: Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float) -> Tensor:
    """Mask2Former's importance sampling: mostly points where |logit| is small, the rest uniform.

    mask_logits [N, h, w] → coords [N, P, 2] in [0, 1]. Training on uncertain points gives the same
    gradient signal as full-resolution masks at a fraction of the memory (Kirillov et al., PointRend).
    """
    n = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=mask_logits.device)
    logits = point_sample(mask_logits, coords)  # [N, S]
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = (-logits.abs()).topk(num_uncertain, dim=1).indices  # [N, U]
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=mask_logits.device)], dim=1)
    return chosen


class SetCriterion(nn.Module):
    """Computes the weighted loss terms; `sum(losses.values())` is the training loss."""

    def __init__(self, matcher: nn.Module, *, class_weight: float, iou_weight: float,
                 dice_weight: float, cos_weight: float, mfe_weight: float, focal_alpha: float,
                 focal_gamma: float, num_points: int, oversample_ratio: float,
                 importance_sample_ratio: float, deep_supervision: bool, ignore_index: int,
                 candidate_queries_from: int | None, groups_normalized_from: int | None,
                 cosine_balance_above: float | None):
        super().__init__()
        self.matcher = matcher
        self.class_weight = class_weight
        self.iou_weight = iou_weight
        self.dice_weight = dice_weight
        self.cos_weight = cos_weight
        self.mfe_weight = mfe_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.ignore_index = ignore_index
        # Queries from this index on (the candidate queries) are scored against the candidate
        # columns of E only, not against the seen text embeddings As (None: against all of E).
        # With As as their negatives, candidate queries learn to stay away from the text
        # embeddings, and so from the unseen class names they must be near at test time:
        # on the toy world their pixels went to the seen queries instead (see docs/method.md).
        self.candidate_queries_from = candidate_queries_from
        # None: every loss divided by all targets of the batch, as Mask2Former does. Ks (per-group
        # normalisation, Split Matching only): queries before it are divided by the seen targets,
        # the rest by the candidate targets, so the many candidates of an image do not drown its
        # few seen objects (docs/method.md, "Loss normalisation").
        self.groups_normalized_from = groups_normalized_from
        # None: L_cos is the plain mean over matched candidates. A cosine: each candidate is
        # weighted by 1 / (matched candidates of the batch whose Cu lie above this cosine of its
        # own), so that the frequent kind of object does not set every candidate query's
        # embedding (the diagnosis in docs/method.md: a rare unseen object named as a frequent).
        self.cosine_balance_above = cosine_balance_above

    # --------------------------------------------------------------------------- terms

    def loss_classes(self, logits: Tensor, targets: list[dict], matches: list[Match],
                     class_valid: Tensor, num_masks: "TargetCounts",
                     num_seen_classes: int = 0) -> Tensor:
        """Focal loss over all queries × valid classes; unmatched queries are 'no object' (all 0).

        The first `num_seen_classes` columns are As; with `candidate_queries_from` set, the
        candidate queries' rows skip them.
        """
        onehot = torch.zeros_like(logits)  # [B, Q, K]
        for b, (q, t) in enumerate(matches):
            onehot[b, q.to(logits.device), targets[b]["labels"][t.to(logits.device)]] = 1.0
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        valid = class_valid[:, None, :].expand_as(loss).to(loss)
        if self.candidate_queries_from is not None and num_seen_classes > 0:
            valid = valid.clone()
            valid[:, self.candidate_queries_from:, :num_seen_classes] = 0.0
        per_query = (loss * valid).sum(-1)  # [B, Q]
        return (per_query * num_masks.query_weights(per_query.shape[1], per_query.device)).sum()

    def loss_masks(self, pred_masks: Tensor, targets: list[dict], matches: list[Match],
                   num_masks: "TargetCounts") -> tuple[Tensor, Tensor]:
        """IoU and dice losses of matched pairs on importance-sampled points."""
        src = torch.cat([pred_masks[b, q.to(pred_masks.device)] for b, (q, _) in enumerate(matches)])
        if src.shape[0] == 0:
            zero = pred_masks.sum() * 0.0
            return zero, zero
        tgt = torch.cat([targets[b]["masks"][t.to(pred_masks.device)]
                         for b, (_, t) in enumerate(matches)])
        with torch.no_grad():
            coords = uncertain_point_coords(src.detach().float(), self.num_points,
                                            self.oversample_ratio, self.importance_sample_ratio)
            tgt_points = point_sample(tgt, coords)
        src_points = point_sample(src.float(), coords)
        weights = num_masks.pair_weights(targets, matches, src.device)
        return ((iou_loss(src_points, tgt_points) * weights).sum(),
                (dice_loss(src_points, tgt_points) * weights).sum())

    def loss_cosine(self, pred_embeds: Tensor, targets: list[dict], matches: list[Match],
                    candidate_embeds: list[Tensor], num_seen_classes: int) -> Tensor:
        """L_cos = 1 − cos(V'u, Cu) over candidate queries matched to candidate targets."""
        losses, matched = [], []
        for b, (q, t) in enumerate(matches):
            t = t.to(pred_embeds.device)
            is_cand = targets[b]["is_candidate"][t]
            if not is_cand.any():
                continue
            cand_index = targets[b]["labels"][t[is_cand]] - num_seen_classes
            v = pred_embeds[b, q.to(pred_embeds.device)[is_cand]]
            c = candidate_embeds[b].to(v)[cand_index]
            losses.append(1 - F.cosine_similarity(v.float(), c.float(), dim=-1))
            matched.append(c.float())
        if not losses:
            return pred_embeds.sum() * 0.0
        losses = torch.cat(losses)
        if self.cosine_balance_above is None:
            return losses.mean()
        weights = balance_weights(torch.cat(matched), self.cosine_balance_above)
        return (losses * weights).sum() / weights.sum()

    def loss_mfe(self, mfe_logits: Tensor, pseudo_labels: Tensor, class_valid: Tensor) -> tuple[Tensor, Tensor]:
        """L_MFE = CE + focal of the per-pixel MFE logits [B, K, h, w] against Yp (labels [B, H, W])."""
        h, w = mfe_logits.shape[-2:]
        # Nearest-neighbour downsampling of Yp: upsampling K-channel logits to label size instead
        # would cost K×H×W memory per image (171 × 512² floats for COCO-Stuff).
        labels = F.interpolate(pseudo_labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        logits = mfe_logits.float().masked_fill(~class_valid[:, :, None, None], -1e4)
        ce = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none")
        valid = labels != self.ignore_index
        if not valid.any():
            zero = mfe_logits.sum() * 0.0
            return zero, zero
        p_t = torch.exp(-ce)
        focal = (1 - p_t).pow(self.focal_gamma) * ce
        return ce[valid].mean(), focal[valid].mean()

    # --------------------------------------------------------------------------- forward

    def forward(self, outputs: dict, targets: list[dict], class_valid: Tensor,
                candidate_embeds: list[Tensor] | None = None, num_seen_classes: int = 0,
                pseudo_labels: Tensor | None = None) -> dict[str, Tensor]:
        """Weighted loss terms. `class_valid` [B, K] marks real columns of the padded class set."""
        num_masks = TargetCounts.of(targets, outputs["pred_logits"].device,
                                    self.groups_normalized_from)
        losses: dict[str, Tensor] = {}
        layers = [("", outputs)]
        if self.deep_supervision:
            layers += [(f"_aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        for suffix, out in layers:
            matches = self.matcher(out, targets)
            losses["loss_cls" + suffix] = self.class_weight * self.loss_classes(
                out["pred_logits"].float(), targets, matches, class_valid, num_masks,
                num_seen_classes)
            iou, dice = self.loss_masks(out["pred_masks"], targets, matches, num_masks)
            losses["loss_iou" + suffix] = self.iou_weight * iou
            losses["loss_dice" + suffix] = self.dice_weight * dice
            if candidate_embeds is not None and self.cos_weight > 0:
                losses["loss_cos" + suffix] = self.cos_weight * self.loss_cosine(
                    out["pred_embeds"], targets, matches, candidate_embeds, num_seen_classes)
        if "mfe_logits" in outputs and pseudo_labels is not None and self.mfe_weight > 0:
            ce, focal = self.loss_mfe(outputs["mfe_logits"], pseudo_labels, class_valid)
            losses["loss_mfe_ce"] = self.mfe_weight * ce
            losses["loss_mfe_focal"] = self.mfe_weight * focal
        return losses


class TargetCounts:
    """The divisors of the loss terms: the targets in the whole (distributed) batch, as Mask2Former
    normalises; with `num_seen_queries` set (per-group normalisation), the seen and the candidate
    targets are counted apart and each query group's terms are divided by its own count."""

    def __init__(self, seen: float, candidate: float, num_seen_queries: int | None):
        self.seen, self.candidate, self.num_seen_queries = seen, candidate, num_seen_queries

    @classmethod
    def of(cls, targets: list[dict], device: torch.device,
           num_seen_queries: int | None) -> "TargetCounts":
        candidate = sum(int(t["is_candidate"].sum()) for t in targets)
        counts = torch.tensor([float(sum(t["labels"].numel() for t in targets) - candidate),
                               float(candidate)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            counts = counts / dist.get_world_size()
        seen, candidate = counts.tolist()
        if num_seen_queries is None:
            seen = candidate = seen + candidate
        return cls(max(seen, 1.0), max(candidate, 1.0), num_seen_queries)

    def query_weights(self, num_queries: int, device: torch.device) -> Tensor:
        """[Q]: the divisor's inverse for each query's classification loss."""
        weights = torch.full((num_queries,), 1.0 / self.seen, device=device)
        if self.num_seen_queries is not None:
            weights[self.num_seen_queries:] = 1.0 / self.candidate
        return weights

    def pair_weights(self, targets: list[dict], matches: list[Match], device: torch.device
                     ) -> Tensor:
        """[N]: the divisor's inverse for each matched (query, target) pair, in `matches` order."""
        is_candidate = torch.cat([targets[b]["is_candidate"][t.to(targets[b]["is_candidate"].device)]
                                  for b, (_, t) in enumerate(matches)]).to(device)
        return torch.where(is_candidate, 1.0 / self.candidate, 1.0 / self.seen)


def pseudo_label_map(labels: Tensor, lut: Tensor, candidate_maps: Tensor | None, num_seen: int,
                     ignore_index: int = 255) -> Tensor:
    """Yp as a label map [B, H, W]: seen index for seen pixels, Ns + j − 1 for candidate j, else ignore."""
    mapped = lut.to(labels.device)[labels.long()]
    out = torch.where(mapped >= 0, mapped, torch.full_like(mapped, ignore_index))
    if candidate_maps is not None:
        cmap = candidate_maps.long().to(labels.device)
        out = torch.where(cmap > 0, num_seen + cmap - 1, out)
    return out


def balance_weights(embeds: Tensor, same_above: float) -> Tensor:
    """1 / (how many of `embeds` [N, C], itself included, lie above cosine `same_above` of each):
    a group of near-identical embeddings weighs about as much as one lone embedding."""
    unit = F.normalize(embeds.detach(), dim=-1)
    same_kind = (unit @ unit.T > same_above).float()
    same_kind.fill_diagonal_(1.0)
    return 1.0 / same_kind.sum(dim=1)


def build_criterion(loss_cfg, matcher: nn.Module, ignore_index: int,
                    num_seen_queries: int | None) -> SetCriterion:
    """`num_seen_queries` is Ks under Split Matching (None in baseline mode: no candidate queries)."""
    candidate_from = num_seen_queries if loss_cfg.candidate_negatives == "candidates" else None
    return SetCriterion(
        matcher, class_weight=loss_cfg.class_weight, iou_weight=loss_cfg.iou_weight,
        dice_weight=loss_cfg.dice_weight, cos_weight=loss_cfg.cos_weight,
        mfe_weight=loss_cfg.mfe_weight, focal_alpha=loss_cfg.focal_alpha,
        focal_gamma=loss_cfg.focal_gamma, num_points=loss_cfg.num_points,
        oversample_ratio=loss_cfg.oversample_ratio,
        importance_sample_ratio=loss_cfg.importance_sample_ratio,
        deep_supervision=loss_cfg.deep_supervision, ignore_index=ignore_index,
        candidate_queries_from=candidate_from,
        groups_normalized_from=(num_seen_queries if loss_cfg.normalization == "per_group"
                                else None),
        cosine_balance_above=(loss_cfg.candidate_pool_max_cosine
                              if loss_cfg.cosine_balance == "batch" else None))
