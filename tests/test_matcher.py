import itertools

import pytest
import torch

from splitmatch.config import LossConfig, MatchingConfig
from splitmatch.matcher import (HungarianMatcher, SplitMatcher, batch_dice_cost,
                                batch_sigmoid_ce_cost, build_hungarian_matcher, focal_class_cost,
                                point_sample)


def hungarian(num_points: int) -> HungarianMatcher:
    """The default config's matcher, on `num_points` points."""
    return build_hungarian_matcher(MatchingConfig(), LossConfig(num_points=num_points))


def brute_force_min(cost):
    q, t = cost.shape
    best = float("inf")
    if q >= t:
        for rows in itertools.permutations(range(q), t):
            best = min(best, sum(cost[r, c].item() for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(t), q):
            best = min(best, sum(cost[r, c].item() for r, c in enumerate(cols)))
    return best


@pytest.mark.parametrize("q, t, seed", [(5, 3, 0), (4, 4, 1), (3, 5, 2), (6, 2, 3), (6, 6, 4)])
def test_solve_equals_brute_force(q, t, seed):
    cost = torch.rand(q, t, generator=torch.Generator().manual_seed(seed)) * 10 - 3
    rows, cols = HungarianMatcher.solve(cost.numpy())
    assert len(rows) == min(q, t)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert cost[rows, cols].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-5)


def random_problem(seed, b=2, q=7, k=6, t=3, u=2, size=16):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(b, q, k + u, generator=g),
               "pred_masks": torch.randn(b, q, size // 4, size // 4, generator=g)}
    targets = []
    for _ in range(b):
        labels = torch.cat([torch.randperm(k, generator=g)[:t], k + torch.arange(u)])
        targets.append({"labels": labels,
                        "masks": (torch.rand(t + u, size, size, generator=g) > 0.5).float(),
                        "is_candidate": torch.arange(t + u) >= t})
    return outputs, targets


def image_costs(matcher, outputs, targets, seed, num_queries=None):
    """The per-image reference of `batch_costs`: each image's cost from its own points, drawn for
    the whole batch from `seed` as the matcher draws them."""
    q = num_queries or outputs["pred_logits"].shape[1]
    coords = torch.rand(len(targets), matcher.num_points, 2,
                        generator=torch.Generator().manual_seed(seed))
    return [matcher.cost_matrix(outputs["pred_logits"][b, :q],
                                point_sample(outputs["pred_masks"][b, :q], coords[b]),
                                t["labels"], point_sample(t["masks"], coords[b]))
            for b, t in enumerate(targets)]


def test_batch_costs_equal_per_image_costs():
    outputs, targets = random_problem(2, b=3)
    targets[1] = {"labels": torch.empty(0, dtype=torch.long), "masks": torch.empty(0, 16, 16),
                  "is_candidate": torch.empty(0, dtype=torch.bool)}
    matcher = hungarian(64)
    costs = matcher.batch_costs(outputs, targets, 5, torch.Generator().manual_seed(7))
    for cost, ref in zip(costs, image_costs(matcher, outputs, targets, 7, num_queries=5)):
        assert cost.shape == tuple(ref.shape)
        assert torch.allclose(torch.from_numpy(cost), ref, atol=1e-5)


def test_forward_is_optimal_on_its_sampled_costs():
    outputs, targets = random_problem(0)
    matcher = hungarian(64)
    matches = matcher(outputs, targets, generator=torch.Generator().manual_seed(5))
    for (rows, cols), cost in zip(matches, image_costs(matcher, outputs, targets, 5)):
        assert cost[rows, cols].sum().item() == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_split_never_crosses_groups_and_is_optimal_per_group():
    ks, ku = 4, 3
    for seed in range(5):
        outputs, targets = random_problem(seed, q=ks + ku)
        matcher = hungarian(64)
        split = SplitMatcher(matcher, ks, ku)
        matches = split(outputs, targets, generator=torch.Generator().manual_seed(seed))
        costs = image_costs(matcher, outputs, targets, seed)
        for b, (rows, cols) in enumerate(matches):
            is_cand = targets[b]["is_candidate"][cols]
            assert torch.equal(rows >= ks, is_cand), "a query was matched across groups"
            assert len(rows) == targets[b]["labels"].numel()  # enough queries in each group
            cost = costs[b]
            seen_t = (~targets[b]["is_candidate"]).nonzero().flatten()
            cand_t = targets[b]["is_candidate"].nonzero().flatten()
            total = cost[rows, cols].sum().item()
            best = (brute_force_min(cost[:ks][:, seen_t]) + brute_force_min(cost[ks:][:, cand_t]))
            assert total == pytest.approx(best, abs=1e-4)


def test_zero_candidate_queries_equals_plain_matcher():
    outputs, targets = random_problem(3, q=6, u=0)
    matcher = hungarian(128)
    plain = matcher(outputs, targets, generator=torch.Generator().manual_seed(1))
    split = SplitMatcher(matcher, 6, 0)(outputs, targets, generator=torch.Generator().manual_seed(1))
    for (r1, c1), (r2, c2) in zip(plain, split):
        o1, o2 = r1.argsort(), r2.argsort()
        assert torch.equal(r1[o1], r2[o2]) and torch.equal(c1[o1], c2[o2])


def test_candidate_targets_unmatched_without_candidate_queries():
    outputs, targets = random_problem(4, q=6)
    matches = SplitMatcher(hungarian(32), 6, 0)(outputs, targets)
    for b, (_, cols) in enumerate(matches):
        assert not targets[b]["is_candidate"][cols].any()


def test_empty_targets():
    outputs, targets = random_problem(0)
    targets[0] = {"labels": torch.empty(0, dtype=torch.long), "masks": torch.empty(0, 16, 16),
                  "is_candidate": torch.empty(0, dtype=torch.bool)}
    for m in (hungarian(32), SplitMatcher(hungarian(32), 4, 3)):
        rows, cols = m(outputs, targets)[0]
        assert rows.numel() == 0 and cols.numel() == 0


def test_cost_functions_against_loops():
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(4, 50, generator=g), (torch.rand(3, 50, generator=g) > 0.5).float()
    dice = batch_dice_cost(inputs, targets)
    bce = batch_sigmoid_ce_cost(inputs, targets)
    for i in range(4):
        for j in range(3):
            p = inputs[i].sigmoid()
            ref = 1 - (2 * (p * targets[j]).sum() + 1) / (p.sum() + targets[j].sum() + 1)
            assert dice[i, j].item() == pytest.approx(ref.item(), abs=1e-6)
            ref_bce = torch.nn.functional.binary_cross_entropy_with_logits(inputs[i], targets[j])
            assert bce[i, j].item() == pytest.approx(ref_bce.item(), abs=1e-6)
    logits = torch.randn(4, 5, generator=g)
    labels = torch.tensor([1, 4])
    cost = focal_class_cost(logits, labels)
    p = logits[2, 4].sigmoid()
    ref = 0.25 * (1 - p) ** 2 * -p.log() - 0.75 * p ** 2 * -(1 - p).log()
    assert cost[2, 1].item() == pytest.approx(ref.item(), abs=1e-5)


def test_point_sample_reads_pixel_centers():
    masks = torch.arange(16.0).view(1, 4, 4)
    coords = torch.tensor([[0.125, 0.125], [0.875, 0.375]])  # centres of pixel (0,0) and (y=1, x=3)
    assert point_sample(masks, coords).tolist() == [[0.0, 7.0]]
