"""`splitmatch toy-clip CONFIG`: build or reuse the toy CLIP and say how good it is."""
from __future__ import annotations

import json
import time
from collections.abc import Callable

from splitmatch import splits
from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig, Config
from splitmatch.toyclip.captions import DEFAULT_RECIPE, TEST_TEMPLATE, ToyClipRecipe
from splitmatch.toyclip.checkpoint import checkpoint_info, toy_clip_checkpoint
from splitmatch.toyclip.quality import pseudo_mask_quality


def main_toy_clip(cfg: Config, log: Callable[[str], None] = print, quality_images: int = 64,
                  recipe: ToyClipRecipe = DEFAULT_RECIPE, shipped: bool = True) -> dict:
    """`splitmatch toy-clip CONFIG`: build or reuse the toy CLIP, print where it is and how good.

    On the toy world it also scores pseudo masks made with the config's `pseudo_masks` settings.
    """
    start = time.perf_counter()
    checkpoint = toy_clip_checkpoint(cfg.toy_clip, build=True, log=log, recipe=recipe,
                                     shipped=shipped)
    info = checkpoint_info(checkpoint)
    report = info["zero_shot"]
    log(f"checkpoint: {checkpoint}")
    log(f"use it with: clip.pretrained: toy (or clip.model_name={cfg.toy_clip.model_name} "
        f"clip.pretrained={checkpoint})")
    log(f"zero-shot accuracy (held-out single-object images, {report['num_images']}, "
        f"'{TEST_TEMPLATE}'): {report['accuracy']:.3f}")
    unseen = set(cfg.data.unseen or splits.default_unseen("toyworld"))
    for name, accuracy in report["per_class"].items():
        log(f"  {name:<13} {accuracy:.3f}" + ("  (unseen in segmentation)" if name in unseen else ""))
    log(f"pretraining took {info['train_seconds']:.0f} s")
    summary = {"checkpoint": str(checkpoint), "zero_shot": report,
               "train_seconds": info["train_seconds"]}
    if cfg.data.dataset == "toyworld" and quality_images > 0:
        clip = build_clip(ClipConfig(model_name=cfg.toy_clip.model_name,
                                     pretrained=str(checkpoint)))
        quality = pseudo_mask_quality(clip, cfg.pseudo_masks, cfg.data, quality_images)
        log(f"pseudo masks with this config ({quality['images']} train images, "
            f"{quality['unseen_segments']} hidden unseen segments): best-match IoU "
            f"{quality['best_match_iou']:.3f}  coverage {quality['coverage']:.3f}  "
            f"candidates/image {quality['candidates_per_image']:.1f}  best candidate named "
            f"right {quality['candidate_class_accuracy']:.3f}")
        summary["pseudo_mask_quality"] = quality
    log(f"done in {time.perf_counter() - start:.0f} s")
    log(json.dumps(summary))  # the last line, for scripts (docs/results/toy_clip.sh)
    return summary
