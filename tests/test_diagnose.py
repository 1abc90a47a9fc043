"""Diagnostics and the multi-split protocol's pure parts, against brute-force references."""
import math

import pytest
import torch

from splitmatch.class_report import per_class_pseudo_quality
from splitmatch.config import Config, config_differences, describe_differences, to_dict
from splitmatch.diagnose import (candidate_composition, naming_counts, owner_cosines, ownership_counts,
                                 query_groups, winning_queries)


def test_config_differences_name_result_keys_only():
    a = Config()
    data = to_dict(a)
    data["data"]["unseen"] = ["zebra"]
    data["train"]["max_iters"] = 8
    data["train"]["log_every"] = 3  # cannot change a result
    data["tracking"]["uri"] = "http://127.0.0.1:1"
    diff = config_differences(to_dict(a), data)
    assert diff == {"data.unseen": (None, ["zebra"]), "train.max_iters": (20000, 8)}
    assert "data.unseen: None -> ['zebra']" in describe_differences(diff)
    assert config_differences(a, to_dict(a)) == {}


def test_a_stored_config_that_predates_a_key_differs_in_it():
    # A run made before loss.candidate_negatives existed was trained as "all" did then; today's
    # default must not be read into its config.yaml.
    stored = to_dict(Config())
    del stored["loss"]["candidate_negatives"]
    del stored["train"]["log_every"]  # neutral keys may be missing freely
    diff = config_differences(stored, Config())
    assert diff == {"loss.candidate_negatives": ("(absent)", "candidates")}
    assert "loss.candidate_negatives: '(absent)' -> 'candidates'" in describe_differences(diff)


def test_winning_query_is_the_largest_term_of_the_predicted_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=g)
    masks = torch.randn(2, 5, 4, 4, generator=g)
    pred, owner = winning_queries(logits, masks, (4, 4))
    probs, m = logits.sigmoid(), masks.sigmoid()
    for b in range(2):
        for y in range(4):
            for x in range(4):
                terms = probs[b, :, :] * m[b, :, y, x][:, None]  # [Q, K]
                k = int(terms.sum(0).argmax())
                assert pred[b, y, x] == k
                assert owner[b, y, x] == int(terms[:, k].argmax())


def test_winning_query_is_scored_with_the_runs_calibration():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 3, generator=g)
    masks = torch.randn(2, 5, 4, 4, generator=g)
    seen, value = [0, 2], 0.3
    pred, owner = winning_queries(logits, masks, (4, 4), seen, value)
    probs, m = logits.sigmoid(), masks.sigmoid()
    probs[..., seen] -= value
    for b in range(2):
        for y in range(4):
            for x in range(4):
                terms = probs[b] * m[b, :, y, x][:, None]
                k = int(terms.sum(0).argmax())
                assert pred[b, y, x] == k and owner[b, y, x] == int(terms[:, k].argmax())
    assert not torch.equal(pred, winning_queries(logits, masks, (4, 4))[0])  # it mattered


def test_naming_counts_split_each_groups_pixels_by_how_it_named_them():
    # Classes 0, 1 seen, 2, 3 unseen; groups 0 seen, 1 candidate, 2 random.
    target = torch.tensor([[2, 2, 2, 2, 0, 255]])
    pred = torch.tensor([[2, 0, 3, 2, 3, 1]])
    group = torch.tensor([[1, 1, 1, 0, 1, 0]])
    counts = naming_counts(group, pred, target, num_classes=4, seen_class_ids=[0, 1])
    assert counts.shape == (4, 3, 3)
    assert counts[2].tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]  # right / as seen / as unseen
    assert counts[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert int(counts.sum()) == 5  # the ignored pixel is not counted


def test_owner_cosines_average_the_winning_candidate_queries_embeddings():
    space = torch.eye(3)  # class k's text is axis k
    embeds = torch.tensor([[[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]]])  # queries 0 seen, 1-2 candidate
    groups = torch.tensor([0, 1, 1])
    owner = torch.tensor([[[1, 1, 2, 0]]])  # [B, H, W]
    target = torch.tensor([[[2, 2, 2, 2]]])
    sums, counts = owner_cosines(embeds, owner, groups[owner], target, space)
    assert counts.tolist() == [0, 0, 3]  # the seen query's pixel is not counted
    assert (sums[2] / counts[2]).tolist() == pytest.approx([0, 2 / 3, 1 / 3])


def test_ownership_and_groups():
    groups = query_groups(2, 3, 1)
    assert groups.tolist() == [0, 0, 1, 1, 1, 2]
    owner = torch.tensor([[0, 2, 5, 4]])
    target = torch.tensor([[1, 1, 0, 255]])
    counts = ownership_counts(groups[owner], target, num_classes=2)
    assert counts.tolist() == [[0, 0, 1], [1, 1, 0]]


def test_candidate_composition_counts_pixels_per_true_class():
    cmap = torch.tensor([[1, 1, 0], [2, 2, 2]], dtype=torch.uint8)
    full = torch.tensor([[3, 255, 0], [255, 255, 1]])
    comp = candidate_composition(cmap, full, num_classes=4)
    assert comp.tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 2]]
    assert candidate_composition(torch.zeros(2, 2, dtype=torch.uint8), full[:, :2], 4).shape == (0, 5)


def test_per_class_pseudo_quality():
    cmap = torch.tensor([[1, 1, 0, 0], [0, 0, 2, 2]], dtype=torch.uint8)
    full = torch.tensor([[7, 7, 7, 255], [255, 255, 8, 255]])
    q = per_class_pseudo_quality([cmap], [full], [7, 8, 9])
    assert q[7] == {"segments": 1, "best_match_iou": pytest.approx(2 / 3), "coverage": pytest.approx(2 / 3)}
    assert q[8]["best_match_iou"] == pytest.approx(1 / 2) and q[8]["coverage"] == 1.0
    assert q[9]["segments"] == 0 and math.isnan(q[9]["best_match_iou"])
