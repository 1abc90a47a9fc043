"""`splitmatch bench pseudo`: the pseudo-mask kernel against the CLIP work it cannot avoid, and the
batched K-means against scikit-learn, on the same toy images, CLIP, features and seeds.

The CLIP is ViT-B/16 (randomly initialised: weights do not change the cost) unless `--clip tiny`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splitmatch.bench.timing import best_of
from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig, DataConfig, PseudoMaskConfig, ToyWorldConfig
from splitmatch.data import build_dataset
from splitmatch.pseudo.kernel import build_kernel
from splitmatch.pseudo.kmeans import batched_kmeans, multi_scale_seeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kmeans_vs_sklearn(dense: torch.Tensor, scales: list[int], iters: int, tol: float,
                      repeats: int) -> dict:
    """Same features, same Eq. 1 seeds: one batched run vs one sklearn KMeans per (image, scale)."""
    from sklearn.cluster import KMeans

    b, c = dense.shape[:2]
    seeds, valid = multi_scale_seeds(dense, scales)  # [B, S, Kmax, C], [S, Kmax]
    s, kmax = valid.shape
    points = dense.flatten(2).transpose(1, 2)  # [B, N, C]
    batched_points = points[:, None].expand(b, s, -1, c).reshape(b * s, -1, c)
    batched_valid = valid[None].expand(b, s, kmax).reshape(b * s, kmax)

    def ours():
        result = batched_kmeans(batched_points, seeds.reshape(b * s, kmax, c), batched_valid, iters, tol)
        _sync(dense.device)
        return result

    ours_s = best_of(ours, repeats, warmup=True)
    inertia_ours = ours()[2].double().sum().item()

    problems = [(points[i].double().cpu().numpy(), seeds[i, j][valid[j]].double().cpu().numpy())
                for i in range(b) for j in range(s)]

    def sklearn_all():
        return sum(KMeans(len(init), init=init, n_init=1, max_iter=iters, tol=tol,
                          algorithm="lloyd").fit(x).inertia_ for x, init in problems)

    inertia_sklearn = sklearn_all()
    sklearn_s = best_of(sklearn_all, repeats)
    return {"ours_s": ours_s, "sklearn_s": sklearn_s, "speedup": sklearn_s / ours_s,
            "inertia_ours": inertia_ours, "inertia_sklearn": inertia_sklearn,
            "inertia_rel_diff": abs(inertia_ours - inertia_sklearn) / inertia_sklearn,
            "problems": len(problems)}


def run(num_images: int = 8, clip_name: str = "ViT-B-16", repeats: int = 3,
        device: str | None = None) -> dict:
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    tiny = clip_name == "tiny"
    clip = build_clip(ClipConfig(model_name="splitmatch-tiny-vit" if tiny else clip_name,
                                 pretrained=None), device=device_t)
    image_size = 128 if tiny else 224
    pseudo = PseudoMaskConfig(image_size=image_size if tiny else None,
                              scales=[6, 8, 10] if tiny else [5, 7, 9], min_area=32)
    kernel = build_kernel(pseudo, clip)
    data = DataConfig(dataset="toyworld", toyworld=ToyWorldConfig(num_train=num_images,
                                                                 image_size=image_size))
    train = build_dataset(data, "train", train=True, augment=False)
    samples = [train[i] for i in range(num_images)]
    images = [s["image"] for s in samples]
    labels = [s["label"] for s in samples]
    batch = kernel.stack([img.to(device_t) for img in images])

    kernel(images, labels)  # warm-up
    _sync(device_t)
    results = []

    def full():
        results[:] = kernel(images, labels)
        _sync(device_t)

    kernel_s = best_of(full, repeats)
    # The CLIP work alone: dense features + masked CLS of exactly the candidates the kernel found.
    masks, owner = [], []
    for b, res in enumerate(results):
        count = int(res.candidate_map.max())
        if count:
            onehot = res.candidate_map[None].long() == torch.arange(1, count + 1)[:, None, None]
            masks.append(F.interpolate(onehot[:, None].float(), size=batch.shape[-2:], mode="area")[:, 0])
            owner += [b] * count
    masks_t = torch.cat(masks).to(device_t)
    owner_t = torch.tensor(owner, device=device_t)

    def clip_only():
        clip.dense_features(batch, image_size=kernel.image_size)
        clip.masked_cls(batch, masks_t, owner_t)
        _sync(device_t)

    clip_s = best_of(clip_only, repeats)
    dense = clip.dense_features(batch, image_size=kernel.image_size).float()
    km = kmeans_vs_sklearn(dense, pseudo.scales, pseudo.kmeans_iters, pseudo.kmeans_tol, repeats)

    print(f"device={device_t} clip={'splitmatch-tiny-vit' if tiny else clip_name} images={num_images} "
          f"({image_size}px toy world) candidates={len(owner)} "
          f"dense_grid={tuple(dense.shape[-2:])} scales={pseudo.scales}")
    print(f"kernel_s={kernel_s:.3f} images_per_s={num_images / kernel_s:.2f}")
    print(f"clip_forward_s={clip_s:.3f} (dense features + masked CLS of the same candidates)")
    print(f"kmeans_batched_s={km['ours_s']:.4f} kmeans_sklearn_s={km['sklearn_s']:.4f} "
          f"({km['problems']} image x scale problems)")
    print(f"inertia_batched={km['inertia_ours']:.4f} inertia_sklearn={km['inertia_sklearn']:.4f} "
          f"inertia_rel_diff={km['inertia_rel_diff']:.5f}")
    print(f"speedup_vs_sklearn={km['speedup']:.2f}")
    ratio = kernel_s / clip_s
    print(f"ratio_kernel_vs_clip={ratio:.3f}")
    return {"kernel_s": kernel_s, "clip_s": clip_s, "ratio": ratio, **km}
