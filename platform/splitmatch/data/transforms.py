"""Training augmentation on uint8 image / int64 label tensors, driven by an explicit generator.

Every random draw takes a `torch.Generator` so a sample's augmentation depends only on
(seed, epoch, index): reruns and DataLoader workers reproduce it, and no global RNG is touched.
Labels are resized with nearest neighbour and padded with the ignore index, so no transform can
invent a class id that was not in the label (in particular no unseen id in train mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def rescale(image: torch.Tensor, label: torch.Tensor, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize by `scale`: bilinear (antialiased when shrinking) image, nearest-neighbour label."""
    height, width = label.shape
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return image, label
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                            antialias=scale < 1.0)  # [1, 3, h, w]
    image = resized[0].round().clamp(0, 255).to(torch.uint8)
    # Label codes below 2^24 (class ids, or class ids packed with candidate ids) are exact in
    # float32, so the round trip through float loses nothing.
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def random_crop(image: torch.Tensor, label: torch.Tensor, crop_size: int, ignore_index: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop_size x crop_size window; smaller inputs are padded (image 0, label ignore) first."""
    height, width = label.shape
    pad_h, pad_w = max(0, crop_size - height), max(0, crop_size - width)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
        height, width = label.shape
    top = int(torch.randint(0, height - crop_size + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_size + 1, (), generator=generator))
    return (image[:, top:top + crop_size, left:left + crop_size],
            label[top:top + crop_size, left:left + crop_size])


def random_hflip(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right with probability 1/2."""
    if float(torch.rand((), generator=generator)) < 0.5:
        return image.flip(-1), label.flip(-1)
    return image, label


@dataclass(frozen=True)
class TrainAugment:
    """Mask2Former-style training augmentation: random rescale, fixed-size crop, horizontal flip."""

    crop_size: int
    min_scale: float = 0.5
    max_scale: float = 2.0
    ignore_index: int = 255

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # image: [3, H, W] uint8, label: [H, W] int64 -> [3, crop, crop], [crop, crop]
        scale = _uniform(self.min_scale, self.max_scale, generator)
        image, label = rescale(image, label, scale)
        image, label = random_crop(image, label, self.crop_size, self.ignore_index, generator)
        return random_hflip(image, label, generator)
