"""ResNet backbone: res2..res5 feature maps (strides 4, 8, 16, 32) from a torchvision ResNet."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Literal

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from splitmatch.config import ConfigError

BackboneName = Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"]
BackboneNorm = Literal["frozen_bn", "gn"]


def resnet10(weights: None = None, **kwargs) -> torchvision.models.ResNet:
    """ResNet-10: resnet18 with one basic block per stage instead of two. For from-scratch runs
    on a laptop: torchvision has no weights for it."""
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], **kwargs)


_BUILDERS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet10": resnet10,
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
}

# `model.backbone_weights: imagenet` means torchvision's ImageNet-1k weights for the chosen depth.
# V1 is the classic recipe (top-1 76.1 / 77.4 for R50 / R101), the one Mask2Former's R50/R101
# start from; V2's longer recipe is not what the paper's numbers were measured with.
IMAGENET = "imagenet"
_IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
}

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _norm_layer(norm: BackboneNorm) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        # ImageNet BN statistics are kept fixed, as detectron2/Mask2Former do: with a few images per
        # GPU (16 over 8 GPUs in the paper) batch statistics are too noisy to re-estimate, and
        # updating them would wreck the pretrained features' calibration.
        return FrozenBatchNorm2d
    if norm == "gn":
        # Without pretrained statistics a frozen BN is an identity and the residual stream grows
        # unnormalised block after block; GroupNorm trains from scratch and does not depend on the
        # per-worker batch size ("Rethinking ImageNet Pre-training", He et al. 2019).
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown backbone norm {norm!r}; expected 'frozen_bn' or 'gn'")


def imagenet_weights_file(name: BackboneName, timeout_s: float = 30.0) -> Path:
    """torchvision's ImageNet weights of `name` in the torch hub cache, downloaded once if absent.

    Offline, the download fails at the first connection attempt (or after `timeout_s` without an
    answer) and the error says where to put the file by hand: a training run must not hang on it.
    """
    if name not in _IMAGENET_WEIGHTS:
        raise ConfigError(f"model.backbone_weights: imagenet: torchvision has no ImageNet weights "
                          f"for {name!r} (only {', '.join(_IMAGENET_WEIGHTS)}); set it to null "
                          f"to train {name} from scratch")
    url = _IMAGENET_WEIGHTS[name].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # urllib (under torch.hub) has no timeout of its own
    try:
        # The file name carries the first hex digits of its sha256; torch.hub checks them.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.split("-")[-1],
                                       progress=False)
    except Exception as exc:  # URLError, timeouts, a bad hash: all mean "no usable file"
        raise ConfigError(
            f"model.backbone_weights: imagenet needs torchvision's {name} weights, which are not "
            f"in the torch hub cache ({path}) and could not be downloaded from {url} "
            f"({type(exc).__name__}: {exc}); download that file on a machine with internet and "
            f"copy it to {path}, or set model.backbone_weights to its path") from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def check_weights(name: BackboneName, weights: str | Path | None) -> None:
    """The weights `model.backbone_weights` names are at hand, checked where a run starts, before
    any Ray Train worker does: the ImageNet file fetched into the torch hub cache (offline, one
    line in seconds), a local file there. A URI is left to the worker that loads it."""
    if weights is None:
        return
    if weights == IMAGENET:
        imagenet_weights_file(name)
        return
    if "://" in str(weights):
        return
    path = Path(weights)
    if not path.is_file():
        cause = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"model.backbone_weights: backbone weights file {str(path)!r} {cause}; "
                          f"set it to a file of {name} weights, or to null to train the backbone "
                          f"from scratch")


def load_imagenet_weights(net: torchvision.models.ResNet, path: str | Path) -> None:
    """Load a torchvision ImageNet state dict into `net` (classifier `fc.*` keys are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {str(path)!r} does not exist (set by model.backbone_weights; "
            f"use null to train the backbone from scratch)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights file {str(path)!r} does not hold a state dict "
                         f"(model.backbone_weights)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # Checked by hand (the fc keys are dropped on purpose, so strict=True would complain): a file
    # for another depth must fail loudly rather than leave layers at random init.
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"backbone weights file {str(path)!r} (model.backbone_weights) does not match the "
            f"architecture: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}")


class ResNetBackbone(nn.Module):
    """torchvision ResNet trunk without its pooling/classifier; returns res2..res5."""

    def __init__(self, name: BackboneName, weights: str | Path | None = None,  # path or "imagenet"
                 norm: BackboneNorm = "frozen_bn") -> None:
        super().__init__()
        if name not in _BUILDERS:
            raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(_BUILDERS)}")
        net = _BUILDERS[name](weights=None, norm_layer=_norm_layer(norm))
        if weights == IMAGENET:
            weights = imagenet_weights_file(name)
        if weights is not None:
            load_imagenet_weights(net, weights)
        self.name = name
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4, self.res5 = net.layer1, net.layer2, net.layer3, net.layer4
        # Basic blocks (10/18/34) keep the width; bottlenecks (50/101) expand it 4x.
        expansion = type(net.layer1[0]).expansion
        self.out_channels: dict[str, int] = {
            f"res{i + 2}": 64 * 2 ** i * expansion for i in range(4)}
        self.out_strides: dict[str, int] = dict(FEATURE_STRIDES)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 3, H, W] normalised -> {"res2": [B, C2, H/4, W/4], ..., "res5": [.., H/32, ..]}"""
        x = self.stem(images)
        features: dict[str, Tensor] = {}
        for name in FEATURE_NAMES:
            x = getattr(self, name)(x)
            features[name] = x
        return features
