"""The Split Matching segmentor: backbone -> pixel decoder -> masked transformer decoder (+ MFE).

The model only predicts; which query is matched to which target (Split Matching) is the matcher's
business. The model's one concession is the query order: queries
[0, Ks) are the seen queries and [Ks, Ks+Ku) the candidate queries, then any random queries.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitmatch.config import InferenceConfig, ModelConfig
from splitmatch.model.backbone import ResNetBackbone
from splitmatch.model.mfe import MultiScaleFeatureEnhancement
from splitmatch.model.pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from splitmatch.model.transformer_decoder import MaskedTransformerDecoder
from splitmatch.targets import centered, embedding_center

# torchvision's ImageNet statistics, on the 0..255 scale of the uint8 input.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor, output_size: tuple[int, int],
                       seen_class_ids: Sequence[int] | Tensor | None = None,
                       seen_score_calibration: float = 0.0) -> Tensor:
    """Per-pixel class scores sum_q p[q, k] * sigmoid(mask_q): pred_logits [B, Q, K],
    pred_masks [B, Q, h, w] -> [B, K, H, W].

    Mask2Former's semantic inference with sigmoid class probabilities (there is no no-object
    column to drop). With `seen_score_calibration` > 0 that amount is subtracted from the seen
    classes' probabilities first: ZegCLIP's inductive calibration against the bias towards the
    classes seen in training.
    """
    return calibrated_scores(pred_logits.sigmoid(), mask_probabilities(pred_masks, output_size),
                             seen_class_ids, seen_score_calibration)


def mask_probabilities(pred_masks: Tensor, output_size: tuple[int, int]) -> Tensor:
    """pred_masks [B, Q, h, w] (logits) -> sigmoid at `output_size` [B, Q, H, W]."""
    return F.interpolate(pred_masks, size=tuple(output_size), mode="bilinear",
                         align_corners=False).sigmoid()


def calibrated_scores(probs: Tensor, masks: Tensor, seen_class_ids: Sequence[int] | Tensor | None,
                      seen_score_calibration: float) -> Tensor:
    """sum_q (p[q, k] - calibration if k is seen) * masks[q]: probs [B, Q, K], masks [B, Q, H, W]
    -> [B, K, H, W]. The part of `semantic_inference` that the calibration changes, so that one
    forward pass can be scored at several values (calibration.py)."""
    probs = calibrated_probabilities(probs, seen_class_ids, seen_score_calibration)
    return torch.einsum("bqk,bqhw->bkhw", probs, masks.to(probs.dtype))


def calibrated_probabilities(probs: Tensor, seen_class_ids: Sequence[int] | Tensor | None,
                             seen_score_calibration: float) -> Tensor:
    """probs [..., K] less the calibration on the seen classes' columns (a copy if changed)."""
    if isinstance(seen_score_calibration, str):  # "auto" is resolved before predicting
        raise ValueError(f"seen_score_calibration must be a number here, got "
                         f"{seen_score_calibration!r}: calibration.calibrate chooses one")
    if seen_score_calibration > 0 and seen_class_ids is not None:
        seen = torch.as_tensor(seen_class_ids, dtype=torch.long, device=probs.device)
        probs = probs.clone()
        probs[..., seen] -= seen_score_calibration
    return probs


class Segmentor(nn.Module):
    """uint8 images + class embeddings -> Mask2Former-style predictions (plain dict)."""

    def __init__(self, backbone: ResNetBackbone, pixel_decoder: nn.Module,
                 transformer_decoder: MaskedTransformerDecoder,
                 mfe: MultiScaleFeatureEnhancement | None, num_seen_queries: int,
                 num_candidate_queries: int, candidate_mlp: nn.Module | None = None,
                 pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if num_seen_queries + num_candidate_queries != transformer_decoder.num_queries:
            raise ValueError(
                f"num_seen_queries ({num_seen_queries}) + num_candidate_queries "
                f"({num_candidate_queries}) must equal the decoder's "
                f"{transformer_decoder.num_queries} learned queries")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.mfe = mfe
        self.num_seen_queries = num_seen_queries
        self.num_candidate_queries = num_candidate_queries
        self.candidate_mlp = candidate_mlp  # model.candidate_embedding "dense_mlp" only
        # Not persistent: they are constants of the input convention, not learned state.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)
        # The seen texts' mean with model.center_embeddings, zeros without: persistent, because
        # any vocabulary given at inference must be centred the way training was.
        self.register_buffer("text_center", torch.zeros(self.embed_dim))
        self.register_load_state_dict_pre_hook(_without_text_center)

    @property
    def embed_dim(self) -> int:
        return self.transformer_decoder.embed_dim

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] RGB 0..255 -> float, ImageNet-normalised."""
        if images.dtype != torch.uint8:
            # Refusing floats catches inputs that were already normalised (and would be twice).
            raise TypeError(f"Segmentor expects torch.uint8 images (RGB 0..255), got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Segmentor expects images [B, 3, H, W], got {tuple(images.shape)}")
        return (images.float() - self.pixel_mean) / self.pixel_std

    def class_space(self, text: Tensor, vocabulary_center: bool = False) -> Tensor:
        """CLIP text embeddings [..., C] as the classifier compares them (centered with
        model.center_embeddings, else only L2-normalised). `vocabulary_center`: centered on
        the mean of `text` [K, C] itself instead of the seen texts' (inference.text_center)."""
        if vocabulary_center and bool(self.text_center.any()):
            return centered(text, embedding_center(text))
        return centered(text, self.text_center)

    def forward(self, images: Tensor, class_embeds: Tensor, num_random_queries: int = 0) -> dict:
        """images uint8 [B, 3, H, W]; class_embeds [K, C] or [B, K, C], L2-normalised, in the
        classifier's space (texts through `class_space`, candidates centred likewise) ->
        {"pred_logits" [B, Q, K], "pred_masks" [B, Q, H/4, W/4], "pred_embeds" [B, Q, C],
        "aux_outputs": [...], "mfe_logits" [B, K, H/8, W/8] (training with MFE only)}"""
        if class_embeds.dim() not in (2, 3) or class_embeds.shape[-1] != self.embed_dim:
            raise ValueError(f"class_embeds must be [K, {self.embed_dim}] or "
                             f"[B, K, {self.embed_dim}], got {tuple(class_embeds.shape)}")
        if class_embeds.dim() == 3 and class_embeds.shape[0] != images.shape[0]:
            raise ValueError(f"class_embeds has {class_embeds.shape[0]} sets for "
                             f"{images.shape[0]} images")
        features = self.backbone(self.normalize(images))
        mask_features, multi_scale = self.pixel_decoder(features)
        output = self.transformer_decoder(multi_scale, mask_features, class_embeds,
                                          num_random_queries=num_random_queries)
        if self.training and self.mfe is not None:
            output["mfe_embeds"] = self.mfe(multi_scale)  # Fu [B, C, H/8, W/8]
            output["mfe_logits"] = self.transformer_decoder.classifier(
                output["mfe_embeds"], class_embeds, channel_dim=1)
        return output

    def rescore(self, output: dict, class_embeds: Tensor) -> dict:
        """The same predictions scored against other class embeddings: every layer's query
        logits and the MFE logits (for candidate embeddings that depend on this very forward)."""
        classifier = self.transformer_decoder.classifier
        layers = [output, *output.get("aux_outputs", [])]
        for layer in layers:
            layer["pred_logits"] = classifier(layer["pred_embeds"], class_embeds)
        if "mfe_embeds" in output:
            output["mfe_logits"] = classifier(output["mfe_embeds"], class_embeds, channel_dim=1)
        return output

    def dense_candidate_embeds(self, output: dict, candidate_maps: Tensor) -> list[Tensor]:
        """Per image, the Fu of each candidate (ids 1..U of `candidate_maps` [B, H, W]) averaged
        over its mask (area-resampled to Fu's size), through `candidate_mlp` when there is one,
        L2-normalised: B × [U_b, C]. Fu is detached: a target the model could move itself would
        collapse onto whatever its queries predict."""
        fu = output["mfe_embeds"].detach()  # [B, C, h, w]
        out = []
        for b in range(fu.shape[0]):
            count = int(candidate_maps[b].max())
            ids = torch.arange(1, count + 1, device=candidate_maps.device)
            onehot = (candidate_maps[b][None].long() == ids[:, None, None]).float()  # [U, H, W]
            weights = F.interpolate(onehot[:, None], size=fu.shape[-2:], mode="area")[:, 0]
            pooled = torch.einsum("uhw,chw->uc", weights, fu[b].float())
            pooled = pooled / weights.flatten(1).sum(1, keepdim=True).clamp_min(1e-6)
            if self.candidate_mlp is not None:
                pooled = self.candidate_mlp(pooled)
            out.append(F.normalize(pooled, dim=-1))
        return out

    @torch.no_grad()
    def predict(self, images: Tensor, text: Tensor, inference: InferenceConfig | None = None,
                seen_class_ids: Sequence[int] | Tensor | None = None) -> Tensor:
        """Class index per pixel -> LongTensor [B, H, W] (eval mode; training flag restored).

        `text` [K, C] are the classes' CLIP text embeddings. `inference` says how (whole image
        or sliding windows, resizing, random queries, calibration); the prediction always has
        the input's size; `inference.seen_score_calibration` must be a number.
        """
        inference = inference or InferenceConfig()
        return self.predict_calibrated(images, text, inference, seen_class_ids,
                                       [inference.seen_score_calibration])[0]

    @torch.no_grad()
    def predict_calibrated(self, images: Tensor, text: Tensor, inference: InferenceConfig,
                           seen_class_ids: Sequence[int] | Tensor | None,
                           calibrations: Sequence[float]) -> list[Tensor]:
        """`predict` at each of `calibrations` (its own `seen_score_calibration` unused) -> one
        LongTensor [B, H, W] per value, from one forward pass per image (per window): the
        calibration only changes how the queries' probabilities are summed into pixel scores,
        and each value's labels equal `predict`'s at that value exactly."""
        class_embeds = self.class_space(text, inference.text_center == "vocabulary")
        was_training = self.training
        self.eval()
        try:
            size = tuple(images.shape[-2:])
            if inference.short_side is not None:
                images = resize_short_side(images, inference.short_side)
            if inference.mode == "slide":
                scores = self._slide_scores(images, class_embeds, inference, seen_class_ids,
                                            calibrations)
            else:
                scores = self._scores(images, class_embeds, inference, seen_class_ids,
                                      calibrations)
        finally:
            self.train(was_training)
        labels = []
        for value_scores in scores:  # [B, K, H', W'] each
            if tuple(value_scores.shape[-2:]) != size:
                value_scores = F.interpolate(value_scores, size=size, mode="bilinear",
                                             align_corners=False)
            labels.append(value_scores.argmax(dim=1))
        return labels

    def _scores(self, images: Tensor, class_embeds: Tensor, inference: InferenceConfig,
                seen_class_ids, calibrations: Sequence[float]) -> list[Tensor]:
        output = self(images, class_embeds, num_random_queries=inference.num_random_queries)
        probs = output["pred_logits"].sigmoid()  # [B, Q, K]
        masks = mask_probabilities(output["pred_masks"], images.shape[-2:])  # [B, Q, H, W]
        return [calibrated_scores(probs, masks, seen_class_ids, value) for value in calibrations]

    def _slide_scores(self, images: Tensor, class_embeds: Tensor, inference: InferenceConfig,
                      seen_class_ids, calibrations: Sequence[float]) -> list[Tensor]:
        scores = count = None
        height, width = images.shape[-2:]
        for y1, y2, x1, x2 in slide_windows(height, width, inference.crop_size, inference.stride):
            windows = self._scores(images[..., y1:y2, x1:x2], class_embeds, inference,
                                   seen_class_ids, calibrations)
            if scores is None:
                scores = [w.new_zeros(*w.shape[:2], height, width) for w in windows]
                count = windows[0].new_zeros(1, 1, height, width)
            for total, window in zip(scores, windows):
                total[..., y1:y2, x1:x2] += window
            count[..., y1:y2, x1:x2] += 1
        return [total / count for total in scores]


def _without_text_center(module: Segmentor, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints from before model.center_embeddings have no text_center: they were trained
    uncentred, which a zero centre reproduces."""
    state_dict.setdefault(prefix + "text_center", torch.zeros_like(module.text_center))


def slide_windows(height: int, width: int, crop: int, stride: int
                  ) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's sliding grid, as ZegCLIP evaluates: a window every `stride`
    pixels, the last row and column shifted back to end flush with the border, so every pixel is
    covered; a side shorter than `crop` is one window spanning it."""
    def spans(size: int) -> list[tuple[int, int]]:
        count = max(size - crop + stride - 1, 0) // stride + 1
        ends = [min(i * stride + crop, size) for i in range(count)]
        return [(max(end - crop, 0), end) for end in ends]
    return [(y1, y2, x1, x2) for y1, y2 in spans(height) for x1, x2 in spans(width)]


def resize_short_side(images: Tensor, short_side: int) -> Tensor:
    """uint8 [B, 3, H, W] -> uint8 with min(H', W') = short_side, aspect ratio kept (bilinear, as
    ZegCLIP's test pipeline resizes before sliding)."""
    height, width = images.shape[-2:]
    factor = short_side / min(height, width)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    if size == (height, width):
        return images
    resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def build_segmentor(cfg: ModelConfig, embed_dim: int) -> Segmentor:
    """The one place that reads ModelConfig; `embed_dim` is the CLIP embedding width C."""
    # Pretrained BN statistics are frozen; without pretrained weights there are no statistics to
    # freeze, so the backbone normalises with GroupNorm instead (see backbone._norm_layer).
    norm = "frozen_bn" if cfg.backbone_weights is not None else "gn"
    backbone = ResNetBackbone(cfg.backbone, weights=cfg.backbone_weights, norm=norm)
    if cfg.pixel_decoder == "msdeform":
        # Mask2Former hard-codes a 1024-wide encoder FFN next to the decoder's 2048: keep the ratio.
        pixel_decoder: nn.Module = MSDeformAttnPixelDecoder(
            backbone.out_channels, cfg.hidden_dim, cfg.mask_dim, cfg.num_heads,
            max(1, cfg.dim_feedforward // 2), cfg.enc_layers)
    elif cfg.pixel_decoder == "fpn":
        pixel_decoder = FPNPixelDecoder(backbone.out_channels, cfg.hidden_dim, cfg.mask_dim)
    else:
        raise ValueError(f"unknown model.pixel_decoder {cfg.pixel_decoder!r}")
    num_queries = cfg.num_seen_queries + cfg.num_candidate_queries
    transformer_decoder = MaskedTransformerDecoder(
        cfg.hidden_dim, cfg.mask_dim, embed_dim, num_queries, cfg.num_heads,
        cfg.dim_feedforward, cfg.dec_layers)
    mfe = None
    if cfg.mfe.enabled:
        mfe = MultiScaleFeatureEnhancement(cfg.hidden_dim, embed_dim, cfg.mfe.norm,
                                           cfg.mfe.num_groups)
    candidate_mlp = None
    if cfg.candidate_embedding == "dense_mlp":
        candidate_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True),
                                      nn.Linear(embed_dim, embed_dim))
    return Segmentor(backbone, pixel_decoder, transformer_decoder, mfe,
                     cfg.num_seen_queries, cfg.num_candidate_queries, candidate_mlp)
