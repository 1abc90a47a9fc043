"""`splitmatch bench pseudo`: the pseudo-mask kernel against the CLIP work it cannot avoid, and the
batched K-means against scikit-learn, on the same toy images, CLIP, features and seeds.

The CLIP is ViT-B/16 (randomly initialised: weights do not change the cost) unless `--clip tiny`.
With `--config`, the config's own CLIP, pseudo-mask settings and training images are timed
instead (e.g. the VOC config on the layout of `splitmatch.data.layouts`, `clip.pretrained=null`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from splitmatch.bench.timing import best_of
from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig, DataConfig, PseudoMaskConfig, ToyWorldConfig, load_config
from splitmatch.data import build_dataset
from splitmatch.errors import UserError
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


def _inputs(num_images: int, clip_name: str, device: torch.device, config, overrides):
    """(clip, pseudo-mask settings, ignore index, samples, what) of the toy set-up, or of the
    first `num_images` training images of a config, read as the pseudo-mask actors read them."""
    if config is not None:
        from splitmatch.toyclip import with_toy_clip
        cfg = with_toy_clip(load_config(config, overrides), log=lambda *_: None)
        clip = build_clip(cfg.clip, device=device)
        data = build_dataset(cfg.data, cfg.data.train_split, train=True, augment=False)
        if len(data) < num_images:
            raise UserError(f"--images {num_images}: split '{cfg.data.train_split}' of "
                            f"{cfg.data.root} has only {len(data)} images")
        samples = [data.load(i) for i in range(num_images)]
        what = (f"clip={cfg.clip.model_name} (pretrained={cfg.clip.pretrained}) {cfg.data.dataset}/"
                f"{cfg.data.train_split} images of {tuple(samples[0]['image'].shape[-2:])}")
        return clip, cfg.pseudo_masks, cfg.data.ignore_index, samples, what
    tiny = clip_name == "tiny"
    clip = build_clip(ClipConfig(model_name="splitmatch-tiny-vit" if tiny else clip_name,
                                 pretrained=None), device=device)
    image_size = 128 if tiny else 224
    pseudo = PseudoMaskConfig(image_size=image_size if tiny else None,
                              scales=[6, 8, 10] if tiny else [5, 7, 9], min_area=32,
                              batch_size=num_images)
    data = DataConfig(dataset="toyworld", toyworld=ToyWorldConfig(num_train=num_images,
                                                                 image_size=image_size))
    train = build_dataset(data, "train", train=True, augment=False)
    samples = [train.load(i) for i in range(num_images)]
    what = (f"clip={'splitmatch-tiny-vit' if tiny else clip_name} (random init) "
            f"toy world of {image_size}px")
    return clip, pseudo, data.ignore_index, samples, what


def run(num_images: int = 8, clip_name: str = "ViT-B-16", repeats: int = 3,
        device: str | None = None, config=None, overrides: list[str] | None = None) -> dict:
    """With `config`, its CLIP and `pseudo_masks` settings on its own training images, in batches
    of `pseudo_masks.batch_size` as each Ray Data actor runs them (one actor's throughput)."""
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    clip, pseudo, ignore_index, samples, what = _inputs(num_images, clip_name, device_t, config,
                                                        overrides or [])
    kernel = build_kernel(pseudo, clip, ignore_index)
    step = max(1, min(pseudo.batch_size, num_images))
    chunks = [samples[i:i + step] for i in range(0, num_images, step)]
    batches = [kernel.stack([s["image"].to(device_t) for s in chunk]) for chunk in chunks]

    kernel([s["image"] for s in chunks[0]], [s["label"] for s in chunks[0]])  # warm-up
    _sync(device_t)
    results: list = []

    def full():
        results[:] = [r for chunk in chunks
                      for r in kernel([s["image"] for s in chunk], [s["label"] for s in chunk])]
        _sync(device_t)

    kernel_s = best_of(full, repeats)
    # The CLIP work alone: dense features + masked CLS of exactly the candidates the kernel found.
    work = []
    for c, batch in enumerate(batches):
        masks, owner = [], []
        for b, res in enumerate(results[c * step:(c + 1) * step]):
            count = int(res.candidate_map.max())
            if count:
                onehot = res.candidate_map[None].long() == torch.arange(1, count + 1)[:, None, None]
                masks.append(F.interpolate(onehot[:, None].float(), size=batch.shape[-2:],
                                           mode="area")[:, 0])
                owner += [b] * count
        work.append((batch, torch.cat(masks).to(device_t) if masks else None,
                     torch.tensor(owner, device=device_t)))

    def clip_only():
        for batch, masks_t, owner_t in work:
            clip.dense_features(batch, image_size=kernel.image_size)
            if masks_t is not None:
                clip.masked_cls(batch, masks_t, owner_t, cls_input=kernel.cls_input)
        _sync(device_t)

    clip_s = best_of(clip_only, repeats)
    dense = clip.dense_features(batches[0], image_size=kernel.image_size).float()
    km = kmeans_vs_sklearn(dense, pseudo.scales, pseudo.kmeans_iters, pseudo.kmeans_tol, repeats)
    candidates = sum(len(o) for _, _, o in work)

    print(f"device={device_t} {what} images={num_images} batch={step} candidates={candidates} "
          f"dense_grid={tuple(dense.shape[-2:])} scales={pseudo.scales} cls_input={pseudo.cls_input}")
    print(f"kernel_s={kernel_s:.3f} images_per_s={num_images / kernel_s:.2f}")
    print(f"clip_forward_s={clip_s:.3f} (dense features + masked CLS of the same candidates)")
    print(f"kmeans_batched_s={km['ours_s']:.4f} kmeans_sklearn_s={km['sklearn_s']:.4f} "
          f"({km['problems']} image x scale problems, first batch)")
    print(f"inertia_batched={km['inertia_ours']:.4f} inertia_sklearn={km['inertia_sklearn']:.4f} "
          f"inertia_rel_diff={km['inertia_rel_diff']:.5f}")
    print(f"speedup_vs_sklearn={km['speedup']:.2f}")
    ratio = kernel_s / clip_s
    print(f"ratio_kernel_vs_clip={ratio:.3f}")
    return {"kernel_s": kernel_s, "clip_s": clip_s, "ratio": ratio,
            "images_per_s": num_images / kernel_s, "candidates": candidates, **km}
