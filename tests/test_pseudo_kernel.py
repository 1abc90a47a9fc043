"""Pseudo-mask maths without Ray: Eq. 1 seeds, batched K-means, fusion, the kernel's guarantees."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig
from splitmatch.pseudo.fusion import connected_groups, cut_candidates, fuse_clusters, region_scores
from splitmatch.pseudo.kernel import PseudoMaskKernel, candidate_quality
from splitmatch.pseudo.kmeans import (batched_kmeans, multi_scale_kmeans, window_seeds,
                                      window_starts)


def eq1_loop(features, s, rows, cols):
    """Eq. 1 as the paper states it: the mean of O over the s×s window at each (i, j) of I × J."""
    c = features.shape[1]
    seeds = []
    for i in rows:
        for j in cols:
            acc = torch.zeros(features.shape[0], c)
            for u in range(i, i + s):
                for v in range(j, j + s):
                    acc += features[:, :, u, v] / s ** 2
            seeds.append(acc)
    return torch.stack(seeds, dim=1)


# Index sets worked out by hand: step ⌊s/2⌋ from 0, and H − s always last (9 for 14 and s = 5,
# off the step grid; 7 for s = 7); s = 1 tiles every cell.
@pytest.mark.parametrize("h, w, s, rows, cols", [
    (14, 14, 5, [0, 2, 4, 6, 8, 9], [0, 2, 4, 6, 8, 9]),
    (14, 14, 7, [0, 3, 6, 7], [0, 3, 6, 7]),
    (14, 14, 9, [0, 4, 5], [0, 4, 5]),
    (9, 12, 4, [0, 2, 4, 5], [0, 2, 4, 6, 8]),
    (8, 8, 1, list(range(8)), list(range(8))),
    (8, 8, 3, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    (20, 20, 6, [0, 3, 6, 9, 12, 14], [0, 3, 6, 9, 12, 14]),
])
def test_eq1_seeds_use_the_index_sets_of_the_paper(h, w, s, rows, cols):
    assert window_starts(h, s) == rows and window_starts(w, s) == cols
    features = torch.randn(2, 6, h, w, generator=torch.Generator().manual_seed(s))
    assert torch.allclose(window_seeds(features, s), eq1_loop(features, s, rows, cols), atol=1e-5)


def test_batched_kmeans_matches_sklearn_per_problem():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3
    problems, seeds = [], []
    for p in range(3):
        pts = centers[torch.randint(0, 4, (120,), generator=g)] + 0.5 * torch.randn(120, 8, generator=g)
        problems.append(pts)
        seeds.append(pts[torch.randperm(120, generator=g)[:5]])
    points, init = torch.stack(problems), torch.stack(seeds)
    centroids, assign, inertia = batched_kmeans(points, init, max_iters=100, tol=1e-6)
    for p in range(3):
        ref = KMeans(5, init=init[p].double().numpy(), n_init=1, max_iter=100, tol=1e-6,
                     algorithm="lloyd").fit(points[p].double().numpy())
        assert inertia[p].item() == pytest.approx(ref.inertia_, rel=1e-3)
        assert np.array_equal(assign[p].numpy(), ref.labels_)


def test_padded_seeds_are_never_used():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(1, 50, 4, generator=g)
    seeds = torch.cat([points[:, :3], torch.zeros(1, 2, 4)], dim=1)
    valid = torch.tensor([[True, True, True, False, False]])
    _, assign, inertia = batched_kmeans(points, seeds, valid)
    _, ref_assign, ref_inertia = batched_kmeans(points, points[:, :3])
    assert assign.max() < 3 and torch.equal(assign, ref_assign)
    assert inertia.item() == pytest.approx(ref_inertia.item())


def blob_features(h=16, w=16, dim=8, seed=0):
    """Hand-made dense features with three known regions (left, top-right, bottom-right)."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(3, dim, generator=g), dim=-1)
    region = torch.zeros(h, w, dtype=torch.long)
    region[:, w // 2:] = 1
    region[h // 2:, w // 2:] = 2
    feats = protos[region] + 0.05 * torch.randn(h, w, dim, generator=g)
    return F.normalize(feats, dim=-1).permute(2, 0, 1), region  # [C, h, w], [h, w]


def test_multiscale_kmeans_and_fusion_recover_known_clusters():
    features, region = blob_features()
    centroids, assign, valid = multi_scale_kmeans(features[None], [4, 6, 8])
    sizes = F.one_hot(assign, valid.shape[1]).sum(2) * valid  # [1, S, Kmax]
    assert int((sizes > 0).sum()) > 3  # the scales found many clusters ...
    groups, group_valid = fuse_clusters(centroids.flatten(1, 2), sizes.flatten(1), threshold=0.8)
    assert int(group_valid.sum()) == 3  # ... which fuse back to the three regions
    found = region_scores(features[None], groups, group_valid)[0].argmax(0)
    for r in range(3):  # each true region maps onto exactly one fused group
        assert found[region == r].unique().numel() == 1
    assert found.unique().numel() == 3


def test_fusion_is_per_image_in_a_batch():
    a, _ = blob_features(seed=0)
    b, _ = blob_features(seed=1)
    feats = torch.stack([a, b])
    centroids, assign, valid = multi_scale_kmeans(feats, [4, 8])
    sizes = (F.one_hot(assign, valid.shape[1]).sum(2) * valid).flatten(1)
    groups, group_valid = fuse_clusters(centroids.flatten(1, 2), sizes, threshold=0.8)
    single, single_valid = fuse_clusters(centroids[1:].flatten(1, 2), sizes[1:], threshold=0.8)
    assert torch.equal(group_valid[1:], single_valid)
    assert torch.allclose(groups[1:][group_valid[1:]], single[single_valid], atol=1e-6)


def test_connected_groups_are_transitive():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.95, 0.0], [0.1, 0.95, 1.0, 0.0],
                        [0.0, 0.0, 0.0, 1.0]])
    assert connected_groups(sim, 0.8).tolist() == [0, 0, 0, 3]


def test_candidates_never_cover_annotated_pixels_and_respect_min_area():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        scores = torch.randn(6, 8, 8, generator=g)
        label = torch.randint(0, 4, (32, 32), generator=g)
        label[torch.rand(32, 32, generator=g) < 0.5] = 255
        cmap = cut_candidates(scores, label == 255, min_area=20)
        assert not ((cmap > 0) & (label != 255)).any()
        areas = torch.bincount(cmap.flatten().long())[1:]
        assert (areas >= 20).all() and areas.numel() == int(cmap.max())
        assert torch.all(areas[:-1] >= areas[1:])  # numbered by decreasing area


def test_min_area_per_region_drops_slivers_that_a_cluster_threshold_keeps():
    # Group 0 owns a 10x10 block and, apart from it, a 2-pixel-wide ring piece (12 pixels);
    # group 1 owns two separate 4x4 squares (32 pixels in all, 16 each); group 2 the rest.
    owner = torch.full((24, 24), 2)
    owner[0:10, 0:10] = 0
    owner[20:22, 12:18] = 0
    owner[12:16, 0:4] = 1
    owner[12:16, 8:12] = 1
    scores = torch.nn.functional.one_hot(owner, 3).permute(2, 0, 1).float()  # at label size
    everywhere = torch.ones(24, 24, dtype=torch.bool)

    by_cluster = cut_candidates(scores, everywhere, min_area=20, min_area_per="cluster")
    by_region = cut_candidates(scores, everywhere, min_area=20, min_area_per="region")
    # Per cluster: every group has >= 20 pixels, so the ring piece and both squares survive.
    assert int(by_cluster.max()) == 3 and (by_cluster[20:22, 12:18] > 0).all()
    assert (by_cluster[12:16, 0:4] > 0).all()
    # Per region: the 12-pixel piece and the 16-pixel squares go; group 1 disappears entirely.
    assert int(by_region.max()) == 2
    assert (by_region[20:22, 12:18] == 0).all()
    assert (by_region[12:16, 0:4] == 0).all() and (by_region[12:16, 8:12] == 0).all()
    assert (by_region[0:10, 0:10] == by_region[0, 0]).all() and by_region[0, 0] > 0
    # Diagonal neighbours are one region (8-connectivity): a diagonal line of 5 pixels survives
    # min_area 5 per region.
    diag_owner = torch.full((8, 8), 1)
    for i in range(5):
        diag_owner[i, i] = 0
    diag_scores = torch.nn.functional.one_hot(diag_owner, 2).permute(2, 0, 1).float()
    kept = cut_candidates(diag_scores, torch.ones(8, 8, dtype=torch.bool), min_area=5,
                          min_area_per="region")
    assert all(kept[i, i] > 0 for i in range(5))


def test_kernel_outputs_and_determinism():
    torch.manual_seed(0)
    clip = build_clip(ClipConfig(model_name="splitmatch-tiny-vit", pretrained=None))
    kernel = PseudoMaskKernel(clip, scales=[4, 6], merge_threshold=0.9, min_area=8, kmeans_iters=30,
                              kmeans_tol=1e-4, image_size=64, ignore_index=255,
                              min_area_per="cluster", cls_input="masked")
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g),
              torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=g)]
    labels = [torch.full((48, 64), 255, dtype=torch.long), torch.full((40, 40), 255, dtype=torch.long)]
    labels[0][:20, :30] = 2  # a seen object
    out = kernel(images, labels)
    again = kernel(images, labels)
    for res, res2, label, image in zip(out, again, labels, images):
        assert res.candidate_map.shape == label.shape and res.candidate_map.dtype == torch.uint8
        assert not ((res.candidate_map > 0) & (label != 255)).any()
        assert res.embeds.dtype == torch.float16 and res.embeds.shape == (int(res.candidate_map.max()), 64)
        assert torch.allclose(res.embeds.float().norm(dim=-1), torch.ones(len(res.embeds)), atol=1e-2)
        assert torch.equal(res.candidate_map, res2.candidate_map) and torch.equal(res.embeds, res2.embeds)
        assert sum(res.areas) == int((res.candidate_map > 0).sum())
    # Cu is the CLS of the image masked to the candidate (same computation as masked_cls directly).
    first = out[0]
    mask = (first.candidate_map == 1).float()
    stacked = kernel.stack(images)
    resized = F.interpolate(mask[None, None], size=stacked.shape[-2:], mode="area")[0]
    direct = clip.masked_cls(stacked[:1], resized, torch.tensor([0]))
    assert torch.allclose(direct[0].half().float(), first.embeds[0].float(), atol=1e-2)


def test_candidate_quality():
    label = torch.full((10, 10), 255, dtype=torch.long)
    label[:5, :5] = 7  # an unseen object
    cmap = torch.zeros(10, 10, dtype=torch.uint8)
    cmap[:5, :4] = 1
    cmap[5:, :] = 2
    q = candidate_quality(cmap, label, [7, 8])
    assert q == {"segments": 1, "best_iou_sum": pytest.approx(20 / 25), "covered_pixels": 20,
                 "unseen_pixels": 25, "best_match": [(7, 0)]}


def test_empty_clusters_are_relocated():
    """Duplicate seeds leave clusters empty after the first step; like scikit-learn, they restart
    at far points instead of staying dead, so every cluster ends up with members."""
    g = torch.Generator().manual_seed(7)
    points = torch.randn(2, 80, 6, generator=g)
    seeds = torch.stack([torch.cat([p[:3], p[:1].repeat(3, 1)]) for p in points])
    centroids, assign, inertia = batched_kmeans(points, seeds, max_iters=50, tol=0.0)
    for p in range(2):
        assert torch.bincount(assign[p], minlength=6).min() > 0
        # A converged Lloyd solution: centroids are the means of their members.
        for k in range(6):
            assert torch.allclose(centroids[p, k], points[p][assign[p] == k].mean(0), atol=1e-5)
        ref = ((points[p] - centroids[p][assign[p]]) ** 2).sum()
        assert inertia[p].item() == pytest.approx(ref.item(), rel=1e-5)


def test_connected_groups_long_chain():
    n = 37  # a path graph needs the full transitive closure
    sim = torch.eye(n)
    idx = torch.arange(n - 1)
    sim[idx, idx + 1] = sim[idx + 1, idx] = 1.0
    assert connected_groups(sim, 0.5).tolist() == [0] * n
