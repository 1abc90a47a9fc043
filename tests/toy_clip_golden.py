"""The shipped toy CLIP's golden outputs (tests/golden/toy_clip_outputs.pt): fixed toy prompts and
images, with what the shipped weights make of them, so that the weights are checked by what they
do rather than keyed by the sources and library build that made them.

Record them again after shipping a new build (`splitmatch.toyclip.ship`):
    python tests/toy_clip_golden.py [CHECKPOINT]
CHECKPOINT defaults to the toy config's shipped weights, expanded as a first run expands them.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from splitmatch.clip import TEMPLATES, FrozenClip, build_clip
from splitmatch.config import ClipConfig, ToyClipConfig, load_config
from splitmatch.data import toyworld
from splitmatch.files import file_sha256
from splitmatch.toyclip import (BACKGROUND_TEMPLATES, CLASS_NAMES, SCENE_TEMPLATES,
                                SINGLE_TEMPLATES, checkpoint_key, toy_clip_checkpoint)
from splitmatch.toyclip.quality import zero_shot_images

GOLDEN = Path(__file__).parent / "golden" / "toy_clip_outputs.pt"
TOY_CONFIG = Path(__file__).parents[1] / "experiments" / "toyworld.yaml"
# Absolute, on L2-normalised outputs. The compact weights gave the full build's outputs to the bit;
# one thread instead of two moves them by 3e-8 (sums in another order), as other CPUs may. The
# same weights rounded to fp16 move them by 7e-5 to 2e-4, other builds by far more.
TOLERANCE = 1e-5


def toy_config(cache_dir: str | Path) -> ToyClipConfig:
    return load_config(TOY_CONFIG, [f"toy_clip.cache_dir={cache_dir}"]).toy_clip


def shipped_clip(toy: ToyClipConfig) -> ClipConfig:
    """The toy config's shipped weights, expanded into `toy`'s cache as a first run expands them."""
    path = toy_clip_checkpoint(toy, build=False, log=lambda _: None)
    return ClipConfig(model_name=toy.model_name, pretrained=str(path))


def golden_inputs() -> dict:
    """Toy prompts (every template, caption form and class name the toy CLIP knows) and images
    (single objects, one scene with its objects' masks)."""
    listings = [f"a {a}, a {b} and a {c}" for a, b, c in zip(CLASS_NAMES, CLASS_NAMES[3:],
                                                           CLASS_NAMES[6:] + CLASS_NAMES)]
    prompts = [template.format(listing) for template, listing in zip(SCENE_TEMPLATES, listings)]
    prompts += list(BACKGROUND_TEMPLATES)
    singles, _ = zero_shot_images(4, seed=0, image_size=64)               # [4, 3, 64, 64]
    scene, label = toyworld.render(7, 64, 3)
    scene = torch.from_numpy(scene).permute(2, 0, 1)[None]                # [1, 3, 64, 64]
    label = torch.from_numpy(label)
    classes = [c for c in label.unique().tolist() if c != toyworld.BACKGROUND]
    return {"prompts": prompts, "images": torch.cat([singles, scene]),
            "masks": torch.stack([label == c for c in classes]),           # [K, 64, 64]
            "mask_image": torch.full((len(classes),), 4, dtype=torch.long)}


@torch.no_grad()
def golden_outputs(clip: FrozenClip, inputs: dict) -> dict[str, Tensor]:
    """What `clip` makes of `inputs`: class and prompt embeddings, image embeddings, the scene's
    dense features and its objects' masked CLS embeddings."""
    images = inputs["images"]
    return {
        "class_text": clip.text_embeddings(CLASS_NAMES, TEMPLATES["single"]),      # [10, C]
        "class_text_all_templates": clip.text_embeddings(CLASS_NAMES, SINGLE_TEMPLATES),
        "prompts": clip.prompt_embeddings(inputs["prompts"]),                      # [P, C]
        "images": clip.encode_images(images),                                      # [5, C]
        "dense": clip.dense_features(images[-1:]),                                 # [1, C, 8, 8]
        "masked_cls": clip.masked_cls(images, inputs["masks"], inputs["mask_image"],
                                      cls_input="masked_crop"),                    # [K, C]
    }


def record(checkpoint: str | None = None) -> Path:
    toy = toy_config(tempfile.mkdtemp())
    cfg = (shipped_clip(toy) if checkpoint is None
           else ClipConfig(model_name=toy.model_name, pretrained=checkpoint))
    inputs = golden_inputs()
    outputs = golden_outputs(build_clip(cfg), inputs)
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save({"key": checkpoint_key(toy), "weights_sha256": file_sha256(cfg.pretrained),
                "inputs": inputs, "outputs": outputs}, GOLDEN)
    return GOLDEN


if __name__ == "__main__":
    print(f"recorded {record(*sys.argv[1:2])}")
