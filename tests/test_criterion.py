import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal

from splitmatch.criterion import (SetCriterion, balance_weights, TargetCounts, dice_loss, iou_loss, pseudo_label_map,
                                  sigmoid_focal_loss, uncertain_point_coords)
from splitmatch.config import LossConfig, MatchingConfig
from splitmatch.matcher import SplitMatcher, build_hungarian_matcher
from splitmatch.targets import (UnseenLabelError, build_targets, class_embedding_sets,
                                seen_lookup)

SEEN = [0, 2, 3]  # global ids 1 and 4 are unseen


def make_batch(seed=0, b=2, q=6, c=8, size=16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((b, size, size), 255, dtype=torch.long)
    labels[:, :8, :8] = 0
    labels[0, 8:, 8:] = 3
    labels[1, :8, 8:] = 2
    cmaps = torch.zeros(b, size, size, dtype=torch.uint8)
    cmaps[:, 10:14, 0:6] = 1
    cmaps[0, 0:4, 10:16] = 2
    cand = [F.normalize(torch.randn(2, c, generator=g), dim=-1),
            F.normalize(torch.randn(1, c, generator=g), dim=-1)]
    text = F.normalize(torch.randn(len(SEEN), c, generator=g), dim=-1)
    outputs = {"pred_logits": torch.randn(b, q, len(SEEN) + 2, generator=g, requires_grad=True),
               "pred_masks": torch.randn(b, q, size // 4, size // 4, generator=g, requires_grad=True),
               "pred_embeds": F.normalize(torch.randn(b, q, c, generator=g), dim=-1).requires_grad_()}
    return labels, cmaps, cand, text, outputs


def test_targets_map_seen_ids_and_candidates():
    labels, cmaps, cand, text, _ = make_batch()
    lut = seen_lookup(SEEN)
    targets = build_targets(labels, lut, cmaps, num_seen=len(SEEN))
    t0 = targets[0]
    assert t0["labels"].tolist() == [0, 2, 3, 4]  # seen idx of ids 0, 3; candidates 1, 2 → 3, 4
    assert t0["is_candidate"].tolist() == [False, False, True, True]
    assert t0["masks"][0].sum() == 64 and t0["masks"][2].sum() == 24
    assert targets[1]["labels"].tolist() == [0, 1, 3]
    embeds, valid = class_embedding_sets(text, cand, 2)
    assert embeds.shape == (2, 5, 8) and valid.tolist() == [[True] * 5, [True] * 4 + [False]]
    assert torch.equal(embeds[0, 3:], cand[0]) and torch.equal(embeds[1, :3], text)


def test_unseen_id_never_reaches_the_loss():
    labels, *_ = make_batch()
    labels[1, 0, 0] = 4  # an unseen class id left in a training label
    with pytest.raises(UnseenLabelError, match=r"\[4\]"):
        build_targets(labels, seen_lookup(SEEN))
    labels[1, 0, 0] = 77  # unknown id
    with pytest.raises(UnseenLabelError):
        build_targets(labels, seen_lookup(SEEN))


def test_pseudo_label_map():
    labels, cmaps, *_ = make_batch()
    yp = pseudo_label_map(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    assert yp[0, 0, 0] == 0 and yp[0, 15, 15] == 2 and yp[0, 12, 2] == 3 and yp[0, 1, 12] == 4
    assert yp[1, 15, 15] == 255


def test_focal_dice_iou_against_references():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 30, generator=g), (torch.rand(5, 30, generator=g) > 0.5).float()
    assert torch.allclose(sigmoid_focal_loss(x, t), tv_focal(x, t, reduction="none"), atol=1e-6)
    p = x.sigmoid()
    ref_iou = 1 - ((p * t).sum(1) + 1) / ((p + t - p * t).sum(1) + 1)
    ref_dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    assert torch.allclose(iou_loss(x, t), ref_iou, atol=1e-6)
    assert torch.allclose(dice_loss(x, t), ref_dice, atol=1e-6)
    perfect = torch.where(t > 0, 20.0, -20.0)
    assert iou_loss(perfect, t).max() < 1e-3 and dice_loss(perfect, t).max() < 1e-3


def test_importance_sampling_prefers_uncertain_points():
    logits = torch.full((1, 8, 8), 10.0)
    logits[0, :, :4] = 0.0  # left half uncertain
    torch.manual_seed(0)
    coords = uncertain_point_coords(logits, num_points=100, oversample_ratio=3.0,
                                    importance_sample_ratio=0.75)
    assert coords.shape == (1, 100, 2)
    assert (coords[0, :75, 0] < 0.5).float().mean() > 0.95


def hungarian(num_points: int):
    """The default config's matcher, on `num_points` points."""
    return build_hungarian_matcher(MatchingConfig(), LossConfig(num_points=num_points))


def criterion(matcher, **kw):
    """The default loss config's criterion on 64 points, baseline-style (no query groups);
    `kw` changes its settings."""
    loss = LossConfig(num_points=64)
    settings = {name: getattr(loss, name) for name in (
        "class_weight", "iou_weight", "dice_weight", "cos_weight", "mfe_weight", "focal_alpha",
        "focal_gamma", "num_points", "oversample_ratio", "importance_sample_ratio",
        "deep_supervision")}
    return SetCriterion(matcher, **{**settings, "ignore_index": 255, "candidate_queries_from": None,
                                    "groups_normalized_from": None, "cosine_balance_above": None,
                                    **kw})


def test_split_losses_and_padding_ignored():
    labels, cmaps, cand, text, outputs = make_batch()
    targets = build_targets(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    _, valid = class_embedding_sets(text, cand, 2)
    crit = criterion(SplitMatcher(hungarian(64), 4, 2), deep_supervision=False)
    torch.manual_seed(0)
    losses = crit(outputs, targets, valid, candidate_embeds=cand, num_seen_classes=3)
    assert set(losses) == {"loss_cls", "loss_iou", "loss_dice", "loss_cos"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # The padding column of image 1 (it has one candidate, image 0 two) must not matter.
    changed = {k: v.detach().clone() for k, v in outputs.items()}
    changed["pred_logits"][1, :, 4] = 50.0
    torch.manual_seed(0)
    again = crit(changed, targets, valid, candidate_embeds=cand, num_seen_classes=3)
    assert again["loss_cls"].item() == pytest.approx(losses["loss_cls"].item(), rel=1e-6)
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0 and outputs["pred_embeds"].grad.abs().sum() > 0


def test_candidate_queries_skip_the_seen_columns_and_groups_normalize_when_asked():
    """Brute force: the focal loss summed by hand, query by query and column by column, divided
    by all targets (joint) or by each query group's own targets (per group)."""
    labels, cmaps, cand, text, outputs = make_batch()
    targets = build_targets(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    _, valid = class_embedding_sets(text, cand, 2)
    matcher = SplitMatcher(hungarian(64), 4, 2)
    matches = matcher(outputs, targets)
    logits = outputs["pred_logits"].detach()
    num_candidate = sum(int(t["is_candidate"].sum()) for t in targets)
    num_all = sum(t["labels"].numel() for t in targets)
    assert 0 < num_candidate < num_all

    def by_hand(candidate_from, per_group=False):
        total = 0.0
        for b in range(2):
            for q in range(6):
                divisor = num_all
                if per_group:
                    divisor = num_candidate if q >= 4 else num_all - num_candidate
                for k in range(5):
                    if not valid[b, k] or (candidate_from is not None and q >= candidate_from
                                           and k < 3):
                        continue
                    pairs = zip(matches[b][0].tolist(), matches[b][1].tolist())
                    target = float(any(qi == q and targets[b]["labels"][ti] == k for qi, ti in pairs))
                    total += sigmoid_focal_loss(logits[b, q, k], torch.tensor(target)).item() / divisor
        return total

    for candidate_from in (None, 4):
        crit = criterion(matcher, candidate_queries_from=candidate_from)
        loss = crit.loss_classes(logits, targets, matches, valid,
                                 TargetCounts.of(targets, logits.device, None), num_seen_classes=3)
        assert loss.item() == pytest.approx(by_hand(candidate_from), rel=1e-5)
        per_group = crit.loss_classes(logits, targets, matches, valid,
                                      TargetCounts.of(targets, logits.device, 4), num_seen_classes=3)
        assert per_group.item() == pytest.approx(by_hand(candidate_from, True), rel=1e-5)
    # The seen queries' rows are the same either way; only candidate rows lose columns.
    assert by_hand(4) < by_hand(None)


def test_cosine_loss_is_zero_when_embeddings_equal_cls():
    labels, cmaps, cand, text, outputs = make_batch()
    targets = build_targets(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    matcher = SplitMatcher(hungarian(64), 4, 2)
    crit = criterion(matcher)
    matches = matcher(outputs, targets)
    embeds = outputs["pred_embeds"].detach().clone()
    for b, (q, t) in enumerate(matches):
        for qi, ti in zip(q.tolist(), t.tolist()):
            if targets[b]["is_candidate"][ti]:
                embeds[b, qi] = cand[b][targets[b]["labels"][ti] - 3]
    loss = crit.loss_cosine(embeds, targets, matches, cand, 3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss = crit.loss_cosine(-embeds, targets, matches, cand, 3)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)


def test_balance_weights_count_each_embedding_s_own_kind():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # Three of one kind (cosine ~1 to each other), one of another: each of the three weighs a
    # third, the lone one a whole; the orthogonal kinds never count each other.
    embeds = torch.stack([a, a * 2, a + 0.01 * b, b])
    assert balance_weights(embeds, 0.5).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    # Above a cosine no pair reaches, every embedding is its own kind.
    assert balance_weights(embeds, 1.1).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_balanced_cosine_loss_weighs_a_rare_kind_like_a_frequent_one():
    labels, cmaps, cand, text, outputs = make_batch()
    cand = [cand[0], cand[0][:1] + 0.1 * cand[1]]  # image 1's candidate: the kind of image 0's first
    targets = build_targets(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    matcher = SplitMatcher(hungarian(64), 4, 2)
    matches = matcher(outputs, targets)
    plain, balanced = criterion(matcher), criterion(matcher, cosine_balance_above=0.5)
    embeds = outputs["pred_embeds"].detach()
    # Every candidate its own kind (cosine threshold above 1): the balanced loss is the mean.
    own = criterion(matcher, cosine_balance_above=1.1)
    assert own.loss_cosine(embeds, targets, matches, cand, 3).item() == pytest.approx(
        plain.loss_cosine(embeds, targets, matches, cand, 3).item(), rel=1e-6)
    # By hand: the per-candidate losses weighted by 1 / (the matched candidates of their kind).
    losses, matched = [], []
    for b, (q, t) in enumerate(matches):
        for qi, ti in zip(q.tolist(), t.tolist()):
            if targets[b]["is_candidate"][ti]:
                c = cand[b][targets[b]["labels"][ti] - 3]
                losses.append(1 - F.cosine_similarity(embeds[b, qi], c, dim=0))
                matched.append(c)
    unit = F.normalize(torch.stack(matched), dim=-1)
    counts = ((unit @ unit.T > 0.5).float() + torch.eye(len(matched))).clamp(max=1).sum(1)
    assert sorted(counts.tolist()) == [1.0, 2.0, 2.0]  # one pair of a kind, one lone candidate
    expected = (torch.stack(losses) / counts).sum() / (1 / counts).sum()
    assert expected.item() != pytest.approx(torch.stack(losses).mean().item(), rel=1e-3)
    assert balanced.loss_cosine(embeds, targets, matches, cand, 3).item() == pytest.approx(
        expected.item(), rel=1e-5)


def test_baseline_mode_ignores_candidates():
    labels, _, _, text, outputs = make_batch()
    outputs["pred_logits"] = outputs["pred_logits"][..., :3].detach().requires_grad_()
    targets = build_targets(labels, seen_lookup(SEEN))
    _, valid = class_embedding_sets(text, None, 2)
    crit = criterion(hungarian(64))
    losses = crit(outputs, targets, valid)
    assert "loss_cos" not in losses and all(torch.isfinite(v) for v in losses.values())


def test_deep_supervision_and_mfe_terms():
    labels, cmaps, cand, text, outputs = make_batch()
    outputs["aux_outputs"] = [{k: v.detach() for k, v in outputs.items()} for _ in range(2)]
    outputs["mfe_logits"] = torch.randn(2, 5, 8, 8, requires_grad=True)
    targets = build_targets(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    _, valid = class_embedding_sets(text, cand, 2)
    yp = pseudo_label_map(labels, seen_lookup(SEEN), cmaps, 3)
    crit = criterion(SplitMatcher(hungarian(64), 4, 2))
    losses = crit(outputs, targets, valid, candidate_embeds=cand, num_seen_classes=3, pseudo_labels=yp)
    for name in ("loss_cls_aux0", "loss_dice_aux1", "loss_cos_aux1", "loss_mfe_ce", "loss_mfe_focal"):
        assert name in losses
    # A confident, correct MFE prediction has near-zero MFE loss.
    small = F.interpolate(yp[:, None].float(), size=(8, 8), mode="nearest")[:, 0].long()
    perfect = torch.full((2, 5, 8, 8), -20.0)
    for b in range(2):
        for k in range(5):
            perfect[b, k][small[b] == k] = 20.0
    ce, focal = crit.loss_mfe(perfect, yp, valid)
    assert ce.item() < 1e-4 and focal.item() < 1e-4


def test_mask_pairs_are_divided_by_their_own_group_under_per_group_normalization():
    labels, cmaps, cand, text, outputs = make_batch()
    targets = build_targets(labels, seen_lookup(SEEN), cmaps, num_seen=3)
    matches = SplitMatcher(hungarian(64), 4, 2)(outputs, targets)
    is_candidate = torch.cat([targets[b]["is_candidate"][t] for b, (_, t) in enumerate(matches)])
    num_candidate = sum(int(t["is_candidate"].sum()) for t in targets)
    num_all = sum(t["labels"].numel() for t in targets)
    joint = TargetCounts.of(targets, torch.device("cpu"), None)
    assert torch.allclose(joint.pair_weights(targets, matches, torch.device("cpu")),
                          torch.full((len(is_candidate),), 1 / num_all))
    grouped = TargetCounts.of(targets, torch.device("cpu"), 4).pair_weights(
        targets, matches, torch.device("cpu"))
    assert torch.allclose(grouped[is_candidate], torch.tensor(1 / num_candidate))
    assert torch.allclose(grouped[~is_candidate], torch.tensor(1 / (num_all - num_candidate)))
    assert is_candidate.any() and (~is_candidate).any()
