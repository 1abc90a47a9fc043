"""Frozen open_clip wrapper: text embeddings, MaskCLIP dense features, masked CLS embeddings.

CLIP is never trained here. It supplies three things to Split Matching (docs/method.md):
- `text_embeddings`: the seen-class embeddings As (prompt templates averaged),
- `dense_features`: MaskCLIP patch features O that K-means clusters into pseudo masks (Eq. 1),
- `masked_cls`: the candidate class embeddings Cu, one per pseudo mask.

Images follow the project convention: `torch.uint8` tensors [B, 3, H, W], RGB, 0..255. The wrapper
does its own preprocessing (resize to the model's input size, scale to 0..1, mean/std) so callers
never have to know which CLIP they hold. Every image is resized to the full input square, without
CLIP's usual centre crop: dense features must cover the whole image so that patch (i, j) maps back
to a known image region, and the masked / plain image embeddings use the same geometry for
consistency. The aspect ratio is therefore not preserved.

Models are built by open_clip's factory from JSON configs: the package's own
`model_configs/` folder (the tiny test CLIP) is always registered next to open_clip's built-ins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from splitmatch import storage
from splitmatch.config import ClipConfig, ConfigError
from splitmatch.files import file_sha256

# ZegCLIP's prompt sets (docs/method.md, "Setting"). VOC habitually uses the single template; COCO-Stuff
# averages these 15.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "coco15": (
        "a photo of a {}.",
        "a photo of a small {}.",
        "a photo of a medium {}.",
        "a photo of a large {}.",
        "This is a photo of a {}.",
        "This is a photo of a small {}.",
        "This is a photo of a medium {}.",
        "This is a photo of a large {}.",
        "a {} in the scene.",
        "a photo of a {} in the scene.",
        "There is a {} in the scene.",
        "There is the {} in the scene.",
        "This is a {} in the scene.",
        "This is the {} in the scene.",
        "This is one {} in the scene.",
    ),
}

PACKAGE_MODEL_CONFIGS = Path(__file__).parent / "model_configs"

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_images(images: Tensor) -> None:
    # A float 0..1 image would pass silently as a near-black one: insist on the convention.
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W] RGB 0..255, got "
                         f"{images.dtype} {tuple(images.shape)}")


class FrozenClip(nn.Module):
    """An open_clip CLIP model held frozen: eval mode forever, no gradients, own preprocessing.

    Args:
        model: an open_clip `CLIP` / `CustomTextCLIP` (anything with `visual`, `encode_image`,
            `encode_text`). `dense_features` additionally needs a `VisionTransformer` tower.
        tokenizer: open_clip tokenizer, `tokenizer(list_of_str) -> LongTensor [N, L]`.
        embed_dim: width C of the joint image-text space (512 for ViT-B/16).
        mean, std: per-channel normalisation of 0..1 RGB pixels the model was trained with.
        image_size: (H, W) the model expects; every input is resized to it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        embed_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: Size,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._embed_dim = int(embed_dim)
        self.image_size = _pair(image_size)
        # Non-persistent: they follow .to(device) but keep state_dict() equal to the CLIP's own.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)

    # ------------------------------------------------------------------ bookkeeping

    def train(self, mode: bool = True) -> "FrozenClip":
        """Always eval: the frozen CLIP must not switch dropout/patch-dropout on inside a trainer
        that calls `.train()` on its whole module tree."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def patch_size(self) -> tuple[int, int]:
        return _pair(self._vit().patch_size)

    def patch_grid(self, image_size: Size | None = None) -> tuple[int, int]:
        """(H', W') of `dense_features` when images are resized to `image_size` (default: the
        model's input size). Independent of the caller's image size, since inputs are resized."""
        height, width = _pair(image_size) if image_size is not None else self.image_size
        patch_h, patch_w = self.patch_size
        return height // patch_h, width // patch_w

    def _vit(self) -> VisionTransformer:
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"MaskCLIP dense features need an open_clip VisionTransformer image tower; this "
                f"CLIP has {type(visual).__name__}. Pick a ViT model in 'clip.model_name'.")
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise TypeError("MaskCLIP dense features need a ViT with a CLS token and a linear "
                            "'proj' (no attentional pooling, no pruned head)")
        return visual

    def preprocess(self, images: Tensor, image_size: Size | None = None) -> Tensor:
        """uint8 [B, 3, H, W] RGB -> normalised float [B, 3, h, w] on the module's device."""
        _check_images(images)
        pixels = images.to(self.device, torch.float32)
        return self._normalize(pixels, image_size)

    def _normalize(self, pixels: Tensor, image_size: Size | None) -> Tensor:
        size = _pair(image_size) if image_size is not None else self.image_size
        return normalize(pixels, self.mean, self.std, size).to(self.dtype)

    # ------------------------------------------------------------------ text

    @torch.no_grad()
    def text_embeddings(self, class_names: Sequence[str], templates: Sequence[str],
                        chunk_size: int = 256) -> Tensor:
        """[N, C] class embeddings: each prompt L2-normalised, mean over templates, re-normalised
        (ZegCLIP's prompt ensembling, docs/method.md "Setting")."""
        if isinstance(templates, str):
            raise TypeError("templates must be a sequence of strings, e.g. TEMPLATES['single']")
        if not templates:
            raise ValueError("templates must not be empty")
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' for the class name")
        names = list(class_names)
        if not names:
            return self._empty()
        prompts = [template.format(name) for template in templates for name in names]
        embeddings = self.prompt_embeddings(prompts, chunk_size)
        embeddings = embeddings.view(len(templates), len(names), -1).mean(dim=0)  # [N, C]
        return F.normalize(embeddings, dim=-1)

    def prompt_embeddings(self, prompts: Sequence[str], chunk_size: int = 256) -> Tensor:
        """[P, C] L2-normalised text embeddings of whole prompts, float32."""
        if not prompts:
            return self._empty()
        tokens = self.tokenizer(list(prompts)).to(self.device)
        # Prompts of similar length share a chunk, so each chunk is trimmed to its own longest.
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
        embeddings = torch.empty(len(prompts), self.embed_dim, device=self.device)
        for i in range(0, len(prompts), chunk_size):
            chunk = order[i:i + chunk_size]
            embeddings[chunk] = self._encode_text(tokens[chunk]).float()
        return embeddings

    def _encode_text(self, tokens: Tensor) -> Tensor:
        """`encode_text(tokens, normalize=True)`, computed on the tokens up to the longest
        prompt's end-of-text only. The text tower is causal and pools at the end-of-text token,
        so the padding after it never reaches the result: a 77-token context for prompts of 10
        to 20 tokens is 4-7x the work (COCO-Stuff's 171 classes x 15 templates took minutes on
        CPU). Models that do not pool that way go through open_clip's own encode_text."""
        model = self.model
        pool = getattr(model, "text_pool_type", None)
        if not isinstance(model, open_clip.CLIP) or model.attn_mask is None or pool != "argmax":
            return model.encode_text(tokens, normalize=True)
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) \
            else x @ model.text_projection
        return F.normalize(x, dim=-1)

    # ------------------------------------------------------------------ images

    @torch.no_grad()
    def encode_images(self, images: Tensor, chunk_size: int = 64) -> Tensor:
        """[B, C] plain CLIP image embeddings (projected CLS), L2-normalised."""
        embeddings = [
            self.model.encode_image(self.preprocess(images[i:i + chunk_size]), normalize=True)
            for i in range(0, images.shape[0], chunk_size)
        ]
        return torch.cat(embeddings) if embeddings else self._empty()

    @torch.no_grad()
    def masked_cls(self, images: Tensor, masks: Tensor, image_index: Tensor,
                   chunk_size: int = 64, cls_input: str = "masked") -> Tensor:
        """[N, C] candidate class embeddings Cu (docs/method.md "Pseudo masks", step 5).

        What CLIP sees of region n of image `image_index[n]` (`cls_input`; the paper says the
        regions are cropped in Sec. 1 and masked in Sec. 3.2):
          - "masked": the whole image with the pixels outside the region set to 0 (black), in
            pixel space before resizing and normalisation (a grey/mean fill would be the
            alternative); soft float masks scale the pixels;
          - "crop": the region's bounding box, widened to a square about its centre (so resizing
            does not distort the object), with its context kept;
          - "masked_crop": that square with the pixels outside the region set to 0.
        The input goes through the full visual tower; the projected CLS embedding is returned
        L2-normalised.

        Args:
            images: uint8 [B, 3, H, W].
            masks: bool or float [N, H, W], same H, W as `images`.
            image_index: long [N], which image each mask belongs to.
            chunk_size: masked images built and encoded at once (bounds memory for large N).
            cls_input: "masked", "crop" or "masked_crop".
        """
        _check_images(images)
        if masks.ndim != 3 or tuple(masks.shape[-2:]) != tuple(images.shape[-2:]):
            raise ValueError(f"masks must be [N, H, W] with the images' H, W "
                             f"{tuple(images.shape[-2:])}, got {tuple(masks.shape)}")
        if image_index.shape != (masks.shape[0],):
            raise ValueError(f"image_index must be [N] = [{masks.shape[0]}], "
                             f"got {tuple(image_index.shape)}")
        if cls_input not in ("masked", "crop", "masked_crop"):
            raise ValueError(f"cls_input must be 'masked', 'crop' or 'masked_crop', got {cls_input!r}")
        embeddings = []
        for start in range(0, masks.shape[0], chunk_size):
            index = image_index[start:start + chunk_size].to(images.device, torch.long)
            pixels = images[index].to(self.device, torch.float32)                 # [n, 3, H, W]
            mask = masks[start:start + chunk_size].to(self.device, torch.float32)  # [n, H, W]
            if cls_input != "crop":
                pixels = pixels * mask[:, None]
            if cls_input == "masked":
                pixels = self._normalize(pixels, None)
            else:
                pixels = torch.cat([self._normalize(crop_square(p, m)[None], None)
                                    for p, m in zip(pixels, mask)])
            embeddings.append(self.model.encode_image(pixels, normalize=True))
        return torch.cat(embeddings) if embeddings else self._empty()

    @torch.no_grad()
    def dense_features(self, images: Tensor, image_size: Size | None = None) -> Tensor:
        """[B, C, H', W'] MaskCLIP dense patch features, L2-normalised per patch.

        Raw last-layer patch tokens are poorly localised (docs/method.md "Pseudo masks", step 1).
        MaskCLIP's fix: in the last block skip query-key attention, so each token only passes
        through the value projection and `out_proj` (attention reduced to the identity map), then
        the MLP sub-block, `ln_post` and `proj`; the CLS token is dropped.

        `image_size` (default: the model's input size) lets dense features be computed at a higher
        resolution than CLIP was trained at; the positional embedding is then bicubically
        interpolated to the new patch grid, as open_clip does when loading checkpoints.
        """
        visual = self._vit()
        pixels = self.preprocess(images, image_size)
        tokens = self._tokens_before_last_block(pixels)              # [B, 1 + H'W', D]
        tokens = _value_path_block(visual.transformer.resblocks[-1], tokens)
        tokens = visual.ln_post(tokens)
        patches = tokens[:, 1:] @ visual.proj                        # [B, H'W', C]
        patches = F.normalize(patches, dim=-1)
        grid_h, grid_w = self.patch_grid(pixels.shape[-2:])
        return patches.view(pixels.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()

    def _tokens_before_last_block(self, pixels: Tensor) -> Tensor:
        """[B, 1 + H'W', D] (batch first) input of the last ViT block for normalised pixels.

        Rebuilt from the tower's public parameters (conv1, class_embedding, positional_embedding,
        ln_pre, transformer.resblocks) rather than open_clip's private `_embeds`, which differs
        between versions and cannot take another input size. Patch dropout is skipped: it is the
        identity in eval mode, which this module never leaves.
        """
        visual = self._vit()
        patches = visual.conv1(pixels)                               # [B, D, H', W']
        batch, width, grid_h, grid_w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)                 # [B, H'W', D]
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, width).expand(batch, -1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        tokens = tokens + _resize_positional_embedding(
            visual.positional_embedding, _pair(visual.grid_size), (grid_h, grid_w)
        ).to(tokens.dtype)
        tokens = visual.ln_pre(tokens)
        transformer = visual.transformer
        # Older open_clip runs the stack sequence-first (LND); the blocks' attention follows suit.
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            tokens = tokens.transpose(0, 1)
        for block in transformer.resblocks[:-1]:
            tokens = block(tokens)
        return tokens if batch_first else tokens.transpose(0, 1)

    def _empty(self) -> Tensor:
        return torch.zeros(0, self.embed_dim, device=self.device, dtype=self.dtype)


def _resize_positional_embedding(positional: Tensor, old_grid: tuple[int, int],
                                 new_grid: tuple[int, int]) -> Tensor:
    """[1 + h*w, D] -> [1 + H*W, D]; the CLS position is kept, the patch grid resized bicubically
    (open_clip's `resize_pos_embed` recipe)."""
    if old_grid == new_grid:
        return positional
    cls_position, grid = positional[:1], positional[1:]
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(positional.dtype)
    return torch.cat([cls_position, grid])


def _value_path_block(block: nn.Module, tokens: Tensor) -> Tensor:
    """The last ViT block with query-key attention skipped (MaskCLIP), batch-first tokens.

    Mirrors open_clip 3.3's two block types, whatever options they were built with:
    - ResidualAttentionBlock: x + ls_1(attn(ln_1 x)), then x + ls_2(mlp(ln_2 x)); attn is
      `nn.MultiheadAttention` with packed `in_proj_weight` [3D, D] (q, k, v thirds) and `out_proj`.
    - CustomResidualAttentionBlock: x + ls_1(ln_attn(attn(ln_1 x))), where its `Attention` may
      scale heads (`head_scale`) and normalise the context (`ln_inner`) before `out_proj`.
    With attention reduced to the identity map, attn(y) = out_proj(ln_inner(head_scale * V y)).
    """
    attn = block.attn
    width = tokens.shape[-1]
    in_proj_weight = getattr(attn, "in_proj_weight", None)
    if in_proj_weight is None:
        raise TypeError(f"{type(attn).__name__} has no packed 'in_proj_weight'; cannot take the "
                        f"value projection for MaskCLIP dense features")
    in_proj_bias = getattr(attn, "in_proj_bias", None)
    values = F.linear(
        block.ln_1(tokens),
        in_proj_weight[2 * width:],
        in_proj_bias[2 * width:] if in_proj_bias is not None else None,
    )                                                                # [B, L, D]
    head_scale = getattr(attn, "head_scale", None)                   # [heads, 1, 1] or None
    if head_scale is not None:
        values = values.unflatten(-1, (head_scale.shape[0], -1)) * head_scale.view(-1, 1)
        values = values.flatten(-2)
    values = getattr(attn, "ln_inner", nn.Identity())(values)
    attended = getattr(block, "ln_attn", nn.Identity())(attn.out_proj(values))
    tokens = tokens + block.ls_1(attended)
    return tokens + block.ls_2(block.mlp(block.ln_2(tokens)))


# ---------------------------------------------------------------------------------- factory

def normalize(pixels: Tensor, mean: Tensor, std: Tensor, size: tuple[int, int]) -> Tensor:
    """0..255 pixels [B, 3, H, W] -> CLIP input: resized to `size` (antialiased bilinear), scaled
    to 0..1, mean/std-normalised. What the frozen CLIP sees, and what the toy CLIP trains on."""
    pixels = pixels.float()
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False,
                               antialias=True)
    return (pixels / 255.0 - mean) / std


_registered_config_dirs: set[str] = set()


def register_config_dir(path: Path) -> None:
    """`open_clip.add_model_config` appends to a global list and rescans; do it once per dir."""
    key = str(path.resolve())
    if key not in _registered_config_dirs:
        open_clip.add_model_config(path)
        _registered_config_dirs.add(key)


def _resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """Check `clip.pretrained` up front so a typo is reported as such, not as a download error.
    A checkpoint on object storage (s3://...) is fetched into this node's mirror."""
    if pretrained is not None and storage.is_remote(pretrained):
        try:
            return storage.resolve_file(pretrained)
        except FileNotFoundError:
            raise ConfigError(f"'clip.pretrained': checkpoint file not found: {pretrained}") from None
    if pretrained is None or os.path.isfile(pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return pretrained
    looks_like_path = os.sep in pretrained or Path(pretrained).suffix in (
        ".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
    if looks_like_path:
        raise ConfigError(f"'clip.pretrained': checkpoint file not found: "
                          f"{Path(pretrained).resolve()}")
    raise ConfigError(
        f"'clip.pretrained' = {pretrained!r} is neither an existing checkpoint file nor an "
        f"open_clip pretrained tag of '{model_name}' (known tags: {tags or 'none'})")


def _check_sha256(pretrained: str | None, expected: str) -> None:
    if pretrained is None or not os.path.isfile(pretrained):
        raise ConfigError(f"'clip.sha256' is set but 'clip.pretrained' ({pretrained!r}) is not a "
                          f"weights file: set 'clip.sha256: null' for a tag or random init")
    actual = file_sha256(pretrained)
    if actual != expected:
        raise ConfigError(f"'clip.pretrained': {pretrained} has sha256 {actual}, not the "
                          f"{expected} of 'clip.sha256': these are other weights")


RANDOM_INIT_SEED = 0  # the weights of a CLIP built without `clip.pretrained` (tests)


def build_clip(cfg: ClipConfig, device: str | torch.device = "cpu") -> FrozenClip:
    """Build the frozen CLIP described by `cfg` (the `clip:` config section).

    `cfg.pretrained` is an open_clip tag (e.g. "openai"; downloads, so needs network or a warm
    cache), a checkpoint file (an open_clip / OpenAI state dict, loaded strictly; a local path or
    an s3:// URI), or None
    for random init (tests). OpenAI ViT-B/16 weights were trained with QuickGELU: loading them
    from a file into "ViT-B-16" needs `force_quick_gelu: true` (or model "ViT-B-16-quickgelu"),
    otherwise the activations silently differ (docs/method.md "Setting").
    Random init is seeded with `RANDOM_INIT_SEED`, whatever the caller's RNG state: every Ray
    worker, pseudo-mask actor and `eval` process then holds the same CLIP, so the class text
    embeddings and the candidates' CLS embeddings agree between them.
    """
    if cfg.model_config_dir is not None:
        config_dir = Path(cfg.model_config_dir)
        if not config_dir.is_dir():
            raise ConfigError(f"'clip.model_config_dir': no such folder: {config_dir.resolve()}")
        register_config_dir(config_dir)
    register_config_dir(PACKAGE_MODEL_CONFIGS)

    has_schema = cfg.model_name.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(cfg.model_name) is None:
        searched = ["open_clip's built-in model_configs", str(PACKAGE_MODEL_CONFIGS)]
        if cfg.model_config_dir is not None:
            searched.append(str(Path(cfg.model_config_dir).resolve()))
        raise ConfigError(
            f"'clip.model_name' = {cfg.model_name!r}: no open_clip model config of that name "
            f"(looked in: {', '.join(searched)}; a config is <name>.json there)")
    pretrained = None if has_schema else _resolve_pretrained(cfg.model_name, cfg.pretrained)
    if cfg.sha256 is not None:
        _check_sha256(pretrained, cfg.sha256)

    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, _ = open_clip.create_model_and_transforms(
                cfg.model_name, pretrained=pretrained, force_quick_gelu=cfg.force_quick_gelu,
                device="cpu")
        model = model.to(device)
    except RuntimeError as exc:
        if pretrained is None or os.path.isfile(pretrained):
            raise
        raise RuntimeError(
            f"'clip.pretrained' = {pretrained!r}: open_clip could not fetch these weights ({exc}). "
            f"Without network access, point 'clip.pretrained' at a local checkpoint file.") from exc

    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    clip = FrozenClip(
        model,
        open_clip.get_tokenizer(cfg.model_name),
        embed_dim=open_clip.get_model_config(cfg.model_name)["embed_dim"],
        mean=preprocess_cfg["mean"],
        std=preprocess_cfg["std"],
        image_size=preprocess_cfg["size"],
    )
    return clip.to(device)


__all__ = ["FrozenClip", "TEMPLATES", "build_clip", "PACKAGE_MODEL_CONFIGS"]


def crop_square(pixels: Tensor, mask: Tensor) -> Tensor:
    """pixels [3, H, W] cut to the bounding box of `mask` > 0 [H, W], widened to a square about
    its centre and clamped to the image (an empty mask gives the whole image)."""
    rows = torch.nonzero(mask.amax(1) > 0).flatten()
    cols = torch.nonzero(mask.amax(0) > 0).flatten()
    height, width = mask.shape
    if rows.numel() == 0:
        return pixels
    y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(y2 - y1, x2 - x1)

    def widen(low: int, high: int, size: int) -> tuple[int, int]:
        length = min(side, size)
        start = min(max((low + high - length) // 2, 0), size - length)
        return start, start + length

    (y1, y2), (x1, x2) = widen(y1, y2, height), widen(x1, x2, width)
    return pixels[:, y1:y2, x1:x2]
