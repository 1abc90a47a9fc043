"""How good a toy CLIP is: zero-shot classification of held-out toy images, and how well the
pseudo masks made with it find (and name) the hidden unseen objects."""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

from splitmatch.clip import TEMPLATES, FrozenClip
from splitmatch.config import PseudoMaskConfig
from splitmatch.data import toyworld
from splitmatch.toyclip.captions import CLASS_NAMES

# Held-out images come from a seed stream of their own (training samples from another).
EVAL_STREAM = zlib.crc32(b"toy-clip/zero-shot")


def zero_shot_images(num_images: int, seed: int, image_size: int) -> tuple[Tensor, Tensor]:
    """Held-out single-object images uint8 [N, 3, S, S] and their class ids [N], classes balanced.

    Drawn from a seed stream of their own (training samples come from another one), so these are
    not training images.
    """
    images, targets = [], []
    for index in range(num_images):
        class_id = index % len(CLASS_NAMES)
        render_seed = np.random.SeedSequence([seed & 0xFFFF_FFFF, EVAL_STREAM, index])
        image, _ = toyworld.render(int(render_seed.generate_state(1)[0]), image_size, 1, [class_id])
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        targets.append(class_id)
    return torch.stack(images), torch.tensor(targets)


def zero_shot_report(clip: FrozenClip, num_images: int = 500, seed: int = 0,
                     image_size: int = 64) -> dict:
    """Zero-shot classification of held-out single-object images against all ten class names
    ("a photo of a {}.", TEMPLATES["single"]): overall and per-class accuracy, confusion matrix."""
    images, targets = zero_shot_images(num_images, seed, image_size)
    text = clip.text_embeddings(CLASS_NAMES, TEMPLATES["single"])      # [10, C]
    predictions = (clip.encode_images(images) @ text.T).argmax(1).cpu()  # [N]
    correct = predictions == targets
    per_class = {name: float(correct[targets == c].float().mean())
                 for c, name in enumerate(CLASS_NAMES) if bool((targets == c).any())}
    n = len(CLASS_NAMES)
    confusion = torch.bincount(targets * n + predictions, minlength=n * n).view(n, n)
    return {"accuracy": float(correct.float().mean()), "per_class": per_class,
            "confusion": confusion.tolist(),  # rows: true class, columns: predicted
            "num_images": num_images, "seed": seed, "image_size": image_size,
            "templates": "single"}


def zero_shot_accuracy(clip: FrozenClip, num_images: int, seed: int, image_size: int) -> float:
    """Overall zero-shot accuracy on held-out single-object toy images (see `zero_shot_report`)."""
    return zero_shot_report(clip, num_images, seed, image_size)["accuracy"]

def pseudo_mask_quality(clip: FrozenClip, pseudo_cfg: PseudoMaskConfig, data_cfg,
                        num_images: int, split: str = "train") -> dict:
    """How well pseudo masks from `clip` find the hidden unseen objects of toy-world images.

    Runs the pipeline's kernel on training-mode labels (unseen pixels are ignore) and scores the
    candidates against the full labels: mean best-match IoU per hidden unseen segment and pixel
    coverage of unseen objects (`candidate_quality`), candidates per image, and how often the
    best-matching candidate's embedding Cu names the segment's class zero-shot ("a photo of a
    {}." over all classes), which is what Split Matching then relies on.
    """
    from splitmatch.data import build_dataset
    from splitmatch.pseudo.kernel import build_kernel, candidate_quality, quality_summary

    train_set = build_dataset(data_cfg, split, train=True, augment=False)
    full_set = build_dataset(data_cfg, split, train=False)
    kernel = build_kernel(pseudo_cfg, clip, data_cfg.ignore_index)
    text = clip.text_embeddings(train_set.class_names, TEMPLATES["single"]).cpu()  # [K, C]
    num_images = min(num_images, len(train_set))
    segments, best_iou_sum, covered, unseen, candidates, named = 0, 0.0, 0, 0, 0, 0
    for start in range(0, num_images, pseudo_cfg.batch_size):
        indices = range(start, min(start + pseudo_cfg.batch_size, num_images))
        samples = [train_set.load(i) for i in indices]
        results = kernel([s["image"] for s in samples], [s["label"] for s in samples])
        for index, result in zip(indices, results):
            q = candidate_quality(result.candidate_map, full_set.load(index)["label"],
                                  train_set.unseen_ids)
            segments += q["segments"]
            best_iou_sum += q["best_iou_sum"]
            covered += q["covered_pixels"]
            unseen += q["unseen_pixels"]
            candidates += result.embeds.shape[0]
            predicted = (result.embeds.float() @ text.float().T).argmax(1)  # [U]
            named += sum(int(predicted[i]) == u for u, i in q["best_match"])
    return {"images": num_images, **quality_summary(segments, best_iou_sum, covered, unseen),
            "candidates_per_image": candidates / num_images if num_images else 0.0,
            "candidate_class_accuracy": named / segments if segments else float("nan")}

