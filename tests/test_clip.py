"""FrozenClip on the tiny offline CLIP (model_configs/splitmatch-tiny-vit.json), random init."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

from splitmatch.clip import TEMPLATES, FrozenClip, _value_path_block, build_clip
from splitmatch.config import ClipConfig, ConfigError

TINY = "splitmatch-tiny-vit"


def tiny_cfg(**overrides) -> ClipConfig:
    return ClipConfig(**{"model_name": TINY, "pretrained": None, **overrides})


def build_tiny(**overrides) -> FrozenClip:
    return build_clip(tiny_cfg(**overrides))


@pytest.fixture(scope="module")
def clip() -> FrozenClip:
    return build_tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 3, 48, 80), dtype=torch.uint8, generator=generator)


def unit_norm(x: torch.Tensor, dim: int = -1) -> bool:
    return torch.allclose(x.norm(dim=dim), torch.ones(()), atol=1e-5)


def test_shapes_and_unit_norm(clip: FrozenClip, images: torch.Tensor) -> None:
    assert clip.embed_dim == 64
    assert clip.image_size == (64, 64)
    assert clip.patch_grid() == (8, 8)
    assert clip.patch_grid(128) == (16, 16)

    dense = clip.dense_features(images)
    assert dense.shape == (3, 64, 8, 8) and unit_norm(dense, dim=1)
    embeddings = clip.encode_images(images)
    assert embeddings.shape == (3, 64) and unit_norm(embeddings)
    text = clip.text_embeddings(["cat", "dog", "road"], TEMPLATES["coco15"])
    assert text.shape == (3, 64) and unit_norm(text)
    masks = torch.rand(4, 48, 80, generator=torch.Generator().manual_seed(2)) > 0.5
    cls = clip.masked_cls(images, masks, torch.tensor([0, 2, 2, 1]))
    assert cls.shape == (4, 64) and unit_norm(cls)
    assert clip.masked_cls(images, masks[:0], torch.zeros(0, dtype=torch.long)).shape == (0, 64)
    assert clip.text_embeddings([], TEMPLATES["single"]).shape == (0, 64)


def test_templates() -> None:
    assert TEMPLATES["single"] == ("a photo of a {}.",)
    assert len(TEMPLATES["coco15"]) == len(set(TEMPLATES["coco15"])) == 15
    assert all("{}" in t for t in TEMPLATES["coco15"])


def test_frozen(clip: FrozenClip) -> None:
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.model.training and not clip.model.visual.training
    with torch.enable_grad():
        out = clip.encode_images(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert not out.requires_grad


def test_deterministic(clip: FrozenClip, images: torch.Tensor) -> None:
    masks = torch.ones(2, 48, 80, dtype=torch.bool)
    index = torch.tensor([0, 1])
    for run in (
        lambda c: c.dense_features(images),
        lambda c: c.encode_images(images),
        lambda c: c.masked_cls(images, masks, index),
        lambda c: c.text_embeddings(["cat", "dog"], TEMPLATES["coco15"]),
    ):
        assert torch.equal(run(clip), run(clip))
    # A random CLIP is one CLIP, whatever the caller's seed: Ray workers seeded per rank, the
    # pseudo-mask actors and `eval` must agree on its text and CLS embeddings.
    torch.manual_seed(1)
    expected_draw = torch.rand(3)
    torch.manual_seed(1)
    again = build_clip(tiny_cfg())
    assert torch.equal(torch.rand(3), expected_draw)  # and the caller's RNG stream is untouched
    for key, value in clip.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert torch.equal(again.dense_features(images), clip.dense_features(images))


def test_dense_features_match_manual_value_path(clip: FrozenClip, images: torch.Tensor) -> None:
    """Recompute MaskCLIP features by hand from the state dict, from the last block's input as
    captured by a hook on open_clip's own forward pass."""
    visual = clip.model.visual
    captured: dict[str, torch.Tensor] = {}
    last = visual.transformer.resblocks[-1]
    handles = [
        last.register_forward_pre_hook(lambda m, args: captured.__setitem__("input", args[0])),
        last.register_forward_hook(lambda m, args, out: captured.__setitem__("output", out)),
    ]
    try:
        clip.encode_images(images[:1])
    finally:
        for handle in handles:
            handle.remove()

    # Our own rebuild of the embeddings + first blocks agrees with open_clip's forward.
    pixels = clip.preprocess(images[:1])
    assert torch.allclose(clip._tokens_before_last_block(pixels), captured["input"], atol=1e-6)

    sd = {k: v for k, v in clip.model.state_dict().items() if k.startswith("visual.")}
    n = len(visual.transformer.resblocks) - 1
    blk = f"visual.transformer.resblocks.{n}."
    width = visual.class_embedding.shape[0]

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"])

    x = captured["input"]                                                 # [1, 65, 64]
    w_v = sd[blk + "attn.in_proj_weight"][2 * width:]
    b_v = sd[blk + "attn.in_proj_bias"][2 * width:]
    v = layer_norm(x, blk + "ln_1") @ w_v.T + b_v
    x = x + v @ sd[blk + "attn.out_proj.weight"].T + sd[blk + "attn.out_proj.bias"]
    h = layer_norm(x, blk + "ln_2") @ sd[blk + "mlp.c_fc.weight"].T + sd[blk + "mlp.c_fc.bias"]
    h = F.gelu(h) @ sd[blk + "mlp.c_proj.weight"].T + sd[blk + "mlp.c_proj.bias"]
    x = x + h
    manual = layer_norm(x, "visual.ln_post")[:, 1:] @ sd["visual.proj"]   # [1, 64, 64]
    manual = F.normalize(manual, dim=-1).view(1, 8, 8, -1).permute(0, 3, 1, 2)

    dense = clip.dense_features(images[:1])
    assert torch.allclose(dense, manual, atol=1e-5)

    raw = layer_norm(captured["output"], "visual.ln_post")[:, 1:] @ sd["visual.proj"]
    raw = F.normalize(raw, dim=-1).view(1, 8, 8, -1).permute(0, 3, 1, 2)
    assert not torch.allclose(dense, raw, atol=1e-3)


@pytest.mark.parametrize("make_block", [
    lambda: ResidualAttentionBlock(32, 4, ls_init_value=0.5),
    lambda: CustomResidualAttentionBlock(32, 4, ls_init_value=0.5, scale_heads=True,
                                         scale_attn_inner=True, scale_attn=True, scale_fc=True),
], ids=["default", "custom"])
def test_value_path_equals_block_with_self_only_attention(make_block) -> None:
    """Skipping query-key attention = attending only to oneself: the block's own forward with a
    diagonal attention mask must give the same tokens, whatever optional layers the block has."""
    torch.manual_seed(3)
    block = make_block().eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.5)
        tokens = torch.randn(2, 7, 32)
        self_only = torch.full((7, 7), float("-inf")).fill_diagonal_(0.0)
        expected = block(tokens, attn_mask=self_only)
        assert torch.allclose(_value_path_block(block, tokens), expected, atol=1e-5)
        assert not torch.allclose(block(tokens), expected, atol=1e-3)


def test_dense_features_other_resolution(clip: FrozenClip, images: torch.Tensor) -> None:
    assert torch.equal(clip.dense_features(images, image_size=64), clip.dense_features(images))
    dense = clip.dense_features(images, image_size=(128, 96))
    assert dense.shape == (3, 64, 16, 12) and unit_norm(dense, dim=1)


def test_masked_cls_reference_masks(clip: FrozenClip, images: torch.Tensor) -> None:
    ones = torch.ones(3, 48, 80, dtype=torch.bool)
    index = torch.tensor([2, 0, 1])
    assert torch.allclose(clip.masked_cls(images, ones, index),
                          clip.encode_images(images[index]), atol=1e-6)

    zeros = torch.zeros(2, 48, 80)
    black = torch.zeros(1, 3, 48, 80, dtype=torch.uint8)
    cls = clip.masked_cls(images, zeros, torch.tensor([0, 1]))
    assert torch.allclose(cls, clip.encode_images(black).expand(2, -1), atol=1e-6)

    # Half mask = the image with the other half painted black; chunking changes nothing.
    half = torch.zeros(4, 48, 80, dtype=torch.bool)
    half[:, :, :40] = True
    index = torch.tensor([0, 1, 2, 0])
    painted = images[index].clone()
    painted[:, :, :, 40:] = 0
    expected = clip.encode_images(painted)
    assert torch.allclose(clip.masked_cls(images, half, index), expected, atol=1e-6)
    assert torch.allclose(clip.masked_cls(images, half.float(), index, chunk_size=3), expected,
                          atol=1e-6)

    with pytest.raises(ValueError, match="masks"):
        clip.masked_cls(images, torch.ones(1, 10, 10), torch.tensor([0]))
    with pytest.raises(ValueError, match="uint8"):
        clip.encode_images(images.float() / 255)
    with pytest.raises(ValueError, match="image_index"):
        clip.masked_cls(images, ones, torch.tensor([0]))


def test_masked_cls_crop_inputs_by_hand(clip: FrozenClip, images: torch.Tensor) -> None:
    # Region rows 10..19, cols 30..49 (10 x 20): the square box is rows 5..24, cols 30..49.
    # Region rows 0..3, cols 0..29 at the top border: the square (30) is clamped to rows 0..29.
    masks = torch.zeros(2, 48, 80, dtype=torch.bool)
    masks[0, 10:20, 30:50] = True
    masks[1, 0:4, 0:30] = True
    index = torch.tensor([1, 2])
    boxes = [(5, 25, 30, 50), (0, 30, 0, 30)]
    crops = [images[i, :, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in zip(index.tolist(), boxes)]
    expected = torch.cat([clip.encode_images(c[None]) for c in crops])
    assert torch.allclose(clip.masked_cls(images, masks, index, cls_input="crop"), expected,
                          atol=1e-5)
    blacked = [c * m[y1:y2, x1:x2] for c, m, (y1, y2, x1, x2) in zip(crops, masks, boxes)]
    expected = torch.cat([clip.encode_images(c[None]) for c in blacked])
    assert torch.allclose(clip.masked_cls(images, masks, index, cls_input="masked_crop"), expected,
                          atol=1e-5)
    with pytest.raises(ValueError, match="cls_input"):
        clip.masked_cls(images, masks, index, cls_input="bbox")


def test_text_embeddings_average_templates(clip: FrozenClip) -> None:
    names = ["cat", "traffic light"]
    templates = TEMPLATES["coco15"][:4]
    per_template = torch.stack([
        F.normalize(clip.model.encode_text(clip.tokenizer([t.format(n) for n in names])), dim=-1)
        for t in templates
    ])                                                                    # [T, N, C]
    manual = F.normalize(per_template.mean(dim=0), dim=-1)
    assert torch.allclose(clip.text_embeddings(names, templates), manual, atol=1e-6)
    assert torch.allclose(clip.text_embeddings(names, templates, chunk_size=3), manual, atol=1e-6)
    single = clip.text_embeddings(names, templates[:1])
    assert torch.allclose(single, per_template[0], atol=1e-6)
    with pytest.raises(ValueError, match="no '{}'"):
        clip.text_embeddings(names, ["a photo"])


def test_load_checkpoint_file(clip: FrozenClip, images: torch.Tensor, tmp_path: Path) -> None:
    """A local state-dict file goes through open_clip's strict loader, as real ViT-B/16 would."""
    generator = torch.Generator().manual_seed(7)  # weights unlike the random init's
    saved = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in clip.model.state_dict().items()}
    checkpoint = tmp_path / "tiny.pt"
    torch.save(saved, checkpoint)
    loaded = build_tiny(pretrained=str(checkpoint))
    for key, value in saved.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert not torch.equal(loaded.encode_images(images), clip.encode_images(images))


def test_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(ConfigError, match="clip.pretrained") as info:
        build_clip(ClipConfig(model_name=TINY, pretrained=str(missing)))
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="clip.pretrained.*neither"):
        build_clip(ClipConfig(model_name=TINY, pretrained="no-such-tag"))
    with pytest.raises(ConfigError, match="clip.model_name") as info:
        build_clip(ClipConfig(model_name="ViT-Nope", pretrained=None))
    assert "model_configs" in str(info.value)
    with pytest.raises(ConfigError, match="clip.model_config_dir"):
        build_clip(tiny_cfg(model_config_dir=str(tmp_path / "missing")))


def test_extra_config_dir_and_non_vit_tower(tmp_path: Path) -> None:
    """A config folder from `clip.model_config_dir` is found; a ResNet tower still embeds images
    but refuses dense features with a message that names the cause."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }
    (tmp_path / "splitmatch-test-rn.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    resnet_clip = build_clip(ClipConfig(model_name="splitmatch-test-rn", pretrained=None,
                                        model_config_dir=str(tmp_path)))
    images = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    assert resnet_clip.encode_images(images).shape == (2, 32)
    with pytest.raises(TypeError, match="VisionTransformer"):
        resnet_clip.dense_features(images)


def test_paper_vit_b16_architecture_builds_offline() -> None:
    """The ViT-B/16 of the paper configs, randomly initialised (weights cannot be downloaded here)."""
    from splitmatch.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "voc_preset.yaml",
                      ["clip.pretrained=null"])
    torch.manual_seed(0)
    clip = build_clip(cfg.clip)
    assert clip.embed_dim == 512
    image = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    assert clip.dense_features(image).shape == (1, 512, 14, 14)
    # Text embeddings computed on the prompts' own length equal open_clip's 77-token ones.
    names, templates = ["cow", "playingfield"], TEMPLATES["coco15"][:3]
    manual = F.normalize(torch.stack([
        F.normalize(clip.model.encode_text(clip.tokenizer([t.format(n) for n in names])), dim=-1)
        for t in templates]).mean(0), dim=-1)
    assert torch.allclose(clip.text_embeddings(names, templates), manual, atol=1e-5)
