import math

import numpy as np
import pytest
import torch

from splitmatch.evaluation import ZSSEvaluator

NAMES = ["a", "b", "c", "d", "e"]


def reference_ious(preds, targets, n, ignore=255):
    """Independent per-class IoU with numpy set counting."""
    p = np.concatenate([x.numpy().ravel() for x in preds])
    t = np.concatenate([x.numpy().ravel() for x in targets])
    keep = t != ignore
    p, t = p[keep], t[keep]
    out = []
    for c in range(n):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        out.append(inter / union * 100 if union else math.nan)
    return out


def test_matches_independent_computation():
    g = torch.Generator().manual_seed(0)
    ev = ZSSEvaluator(NAMES, unseen=["d", "e"])
    preds, targets = [], []
    for _ in range(4):
        t = torch.randint(0, 5, (2, 17, 13), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.2] = 255
        p = torch.where(torch.rand(t.shape, generator=g) < 0.6, t.clamp(max=4),
                        torch.randint(0, 5, t.shape, generator=g))
        ev.update(p, t)
        preds.append(p)
        targets.append(t)
    res = ev.compute()
    ref = reference_ious(preds, targets, 5)
    for name, value in zip(NAMES, ref):
        assert res["per_class"][name] == pytest.approx(value)
    s, u = np.mean(ref[:3]), np.mean(ref[3:])
    assert res["sIoU"] == pytest.approx(s)
    assert res["uIoU"] == pytest.approx(u)
    assert res["hIoU"] == pytest.approx(2 * s * u / (s + u))
    assert res["mIoU"] == pytest.approx(np.mean(ref))


def test_absent_class_excluded_from_means():
    ev = ZSSEvaluator(NAMES, unseen=["e"])
    t = torch.tensor([[0, 0, 1, 1, 4, 4]])
    p = torch.tensor([[0, 0, 1, 0, 4, 4]])  # classes 2, 3 absent from both
    ev.update(p, t)
    res = ev.compute()
    assert math.isnan(res["per_class"]["c"]) and math.isnan(res["per_class"]["d"])
    iou_a, iou_b = 2 / 3 * 100, 1 / 2 * 100
    assert res["sIoU"] == pytest.approx((iou_a + iou_b) / 2)
    assert res["uIoU"] == pytest.approx(100.0)


def test_class_only_predicted_counts_as_zero():
    ev = ZSSEvaluator(NAMES, unseen=["e"])
    ev.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    assert ev.compute()["per_class"]["c"] == 0.0


def test_one_matrix_over_the_split_not_mean_of_images():
    ev = ZSSEvaluator(["x", "y"], unseen=["y"])
    ev.update(torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 0, 0]]))
    ev.update(torch.tensor([[1]]), torch.tensor([[1]]))
    # Pooled counts: y has one false positive in image 1 and one true positive in image 2 → 1/2;
    # averaging per-image IoUs would give y = (0 + 1) / 2 only by coincidence, x = 3/4 either way.
    res = ev.compute()
    assert res["per_class"]["x"] == pytest.approx(75.0)
    assert res["per_class"]["y"] == pytest.approx(50.0)


def test_bad_inputs():
    ev = ZSSEvaluator(NAMES, unseen=["e"])
    with pytest.raises(ValueError, match="outside"):
        ev.update(torch.tensor([[0]]), torch.tensor([[9]]))
    with pytest.raises(ValueError, match="shape"):
        ev.update(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not among"):
        ZSSEvaluator(NAMES, unseen=["zzz"])
