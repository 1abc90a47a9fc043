"""Model tests: shapes of the output contract, MFE/random-query behaviour, and brute-force references
for the optimised pieces (deformable sampling, attention masks, semantic inference)."""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from splitmatch.cli import main as cli_main
from splitmatch.config import ConfigError, InferenceConfig, MFEConfig, ModelConfig
from splitmatch.model import build_segmentor, semantic_inference
from splitmatch.model.segmentor import resize_short_side, slide_windows
from splitmatch.model.backbone import ResNetBackbone, check_weights, imagenet_weights_file
from splitmatch.model.pixel_decoder import (MSDeformAttnPixelDecoder, ms_deform_attn_sample,
                                            sine_position_encoding)
from splitmatch.model.transformer_decoder import attention_mask_from_masks

EMBED_DIM = 16
NUM_CLASSES = 7


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(backbone="resnet18", pixel_decoder="msdeform", hidden_dim=32, mask_dim=32,
                      num_heads=2, dim_feedforward=64, enc_layers=2, dec_layers=3,
                      num_seen_queries=5, num_candidate_queries=3,
                      mfe=MFEConfig(enabled=True, norm="gn", num_groups=8))
    return dataclasses.replace(cfg, **overrides)


def images(batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8,
                         generator=generator)


def class_embeddings(num: int = NUM_CLASSES, batch: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (num, EMBED_DIM) if batch is None else (batch, num, EMBED_DIM)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_segmentor(tiny_config(), EMBED_DIM)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("decoder", ["msdeform", "fpn"])
def test_pixel_decoder_shapes(decoder):
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(pixel_decoder=decoder), EMBED_DIM)
    x = seg.normalize(images(height=64, width=96))
    mask_features, multi_scale = seg.pixel_decoder(seg.backbone(x))
    assert mask_features.shape == (2, 32, 16, 24)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 3), (2, 32, 4, 6), (2, 32, 8, 12)]


@pytest.mark.parametrize("decoder", ["msdeform", "fpn"])
def test_output_contract(decoder):
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(pixel_decoder=decoder), EMBED_DIM).eval()
    with torch.no_grad():
        out = seg(images(), class_embeddings())
    q = seg.num_seen_queries + seg.num_candidate_queries
    assert (seg.num_seen_queries, seg.num_candidate_queries) == (5, 3)
    assert out["pred_logits"].shape == (2, q, NUM_CLASSES)
    assert out["pred_masks"].shape == (2, q, 16, 16)
    assert out["pred_embeds"].shape == (2, q, EMBED_DIM)
    assert torch.allclose(out["pred_embeds"].norm(dim=-1), torch.ones(2, q), atol=1e-5)
    assert "mfe_logits" not in out
    assert len(out["aux_outputs"]) == 3  # initial queries + layers 1..2; layer 3 is the final one
    for aux in out["aux_outputs"]:
        assert {k: tuple(v.shape) for k, v in aux.items()} == {
            "pred_logits": (2, q, NUM_CLASSES), "pred_masks": (2, q, 16, 16),
            "pred_embeds": (2, q, EMBED_DIM)}


def test_initial_class_probability_is_focal_prior(model):
    # With random embeddings the cosine is ~0, so the sigmoid sits near the 0.01 prior.
    logit_bias = model.transformer_decoder.classifier.logit_bias
    assert math.isclose(torch.sigmoid(logit_bias).item(), 0.01, rel_tol=1e-5)
    assert math.isclose(model.transformer_decoder.classifier.logit_scale.exp().item(), 10.0,
                        rel_tol=1e-5)


def test_shared_and_per_image_class_embeddings_agree(model):
    model.eval()
    shared = class_embeddings()
    with torch.no_grad():
        a = model(images(), shared)
        b = model(images(), shared[None].expand(2, -1, -1).contiguous())
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)


def test_rejects_float_images(model):
    with pytest.raises(TypeError, match="uint8"):
        model(images().float(), class_embeddings())


# ----------------------------------------------------------------------------- MFE


@pytest.mark.parametrize("norm", ["gn", "bn", "none"])
def test_mfe_only_in_training(norm):
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(mfe=MFEConfig(enabled=True, norm=norm, num_groups=8)),
                          EMBED_DIM)
    seg.train()
    out = seg(images(), class_embeddings())
    assert out["mfe_logits"].shape == (2, NUM_CLASSES, 8, 8)
    seg.eval()
    with torch.no_grad():
        assert "mfe_logits" not in seg(images(), class_embeddings())


@pytest.mark.parametrize("kind", ["dense", "dense_mlp"])
def test_dense_candidate_embeddings_average_fu_over_each_mask(kind):
    """Table 3's Fu embeddings, by hand: the area-weighted mean of Fu over each candidate mask,
    (through the MLP), normalised; rescoring equals a forward pass given those embeddings."""
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(candidate_embedding=kind), EMBED_DIM).train()
    x = images(batch=2)
    out = seg(x, class_embeddings(batch=2))
    fu = out["mfe_embeds"].detach()  # [2, C, 8, 8] for 64-px images
    maps = torch.zeros(2, 64, 64, dtype=torch.uint8)
    maps[0, :16, :32] = 1   # exactly Fu cells rows 0-1, cols 0-3
    maps[0, 40:, 40:] = 2   # rows 5-7, cols 5-7
    maps[1, 8:24, 8:16] = 1  # rows 1-2, col 1
    embeds = seg.dense_candidate_embeds(out, maps)
    assert [e.shape for e in embeds] == [(2, EMBED_DIM), (1, EMBED_DIM)]
    by_hand = [[fu[0, :, 0:2, 0:4].mean((1, 2)), fu[0, :, 5:8, 5:8].mean((1, 2))],
               [fu[1, :, 1:3, 1:2].mean((1, 2))]]
    for got, expected in zip(embeds, by_hand):
        expected = torch.stack(expected)
        if seg.candidate_mlp is not None:
            expected = seg.candidate_mlp(expected)
        assert torch.allclose(got, F.normalize(expected, dim=-1), atol=1e-5)
    seen = class_embeddings(num=3)
    joint = torch.zeros(2, 5, EMBED_DIM)
    joint[:, :3] = seen
    joint[0, 3:5] = embeds[0].detach()
    joint[1, 3:4] = embeds[1].detach()
    rescored = seg.rescore(out, joint)
    torch.manual_seed(0)
    fresh = seg(x, joint)
    assert torch.allclose(rescored["pred_logits"], fresh["pred_logits"], atol=1e-5)
    assert torch.allclose(rescored["aux_outputs"][0]["pred_logits"],
                          fresh["aux_outputs"][0]["pred_logits"], atol=1e-5)
    assert torch.allclose(rescored["mfe_logits"], fresh["mfe_logits"], atol=1e-5)


def test_mfe_disabled_gives_no_logits():
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(mfe=MFEConfig(enabled=False)), EMBED_DIM).train()
    assert seg.mfe is None
    assert "mfe_logits" not in seg(images(), class_embeddings())


def test_random_queries_extend_q_and_are_deterministic(model):
    model.eval()
    with torch.no_grad():
        first = model(images(), class_embeddings(), num_random_queries=4)
        second = model(images(), class_embeddings(), num_random_queries=4)
    assert first["pred_logits"].shape == (2, 8 + 4, NUM_CLASSES)
    assert first["pred_masks"].shape == (2, 8 + 4, 16, 16)
    assert all(a["pred_logits"].shape[1] == 12 for a in first["aux_outputs"])
    for key in ("pred_logits", "pred_masks", "pred_embeds"):
        assert torch.equal(first[key], second[key])
    # The random queries are not copies of the learned ones.
    feats, pos = model.transformer_decoder.random_queries(4, torch.device("cpu"), torch.float32)
    assert feats.shape == pos.shape == (4, 32)
    assert not torch.equal(feats, pos)


# ----------------------------------------------------------------------------- attention mask


def test_attention_mask_unblocks_fully_blocked_rows():
    mask_logits = torch.full((1, 3, 4, 4), -5.0)  # all three queries: empty masks
    mask_logits[0, 0, :2, :2] = 5.0  # query 0 covers the top-left quarter
    mask_logits[0, 2, :, :] = 5.0  # query 2 covers everything
    blocked = attention_mask_from_masks(mask_logits, (4, 4), num_heads=2)
    assert blocked.shape == (2, 3, 16) and blocked.dtype == torch.bool
    expected_q0 = torch.ones(4, 4, dtype=torch.bool)
    expected_q0[:2, :2] = False
    for head in range(2):
        assert torch.equal(blocked[head, 0], expected_q0.flatten())
        assert not blocked[head, 1].any()  # fully blocked row -> unblocked
        assert not blocked[head, 2].any()
    # A mask that is empty after resizing to a coarser level is unblocked there too.
    tiny = torch.full((1, 1, 8, 8), -5.0)
    tiny[0, 0, 0, 0] = 5.0
    assert not attention_mask_from_masks(tiny, (2, 2), num_heads=1).any()


# ----------------------------------------------------------------------------- deformable attention


def bilinear_sample_naive(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image [C, h, w]; (x, y) in [0, 1] of the map's extent; zeros outside."""
    _, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5  # pixel centres at integer coordinates
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * image[:, yi, xi]
    return out


def test_ms_deform_attn_sampling_matches_naive_loop():
    generator = torch.Generator().manual_seed(0)
    batch, num_query, heads, head_dim, points = 2, 5, 2, 3, 2
    shapes = [(3, 4), (2, 2), (5, 3)]
    levels = len(shapes)
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=generator, dtype=torch.float64)
    # Some locations fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, num_query, heads, levels, points, 2, generator=generator,
                           dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, num_query, heads, levels, points, generator=generator,
                         dtype=torch.float64)
    fast = ms_deform_attn_sample(value, shapes, locations, weights)

    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    expected = torch.zeros(batch, num_query, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(num_query):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    image = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(head_dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        expected[b, q, m] += weights[b, q, m, lvl, p] * bilinear_sample_naive(
                            image, x, y)
    assert torch.allclose(fast, expected.reshape(batch, num_query, heads * head_dim), atol=1e-10)


def test_msdeform_decoder_without_encoder_layers():
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder({"res2": 8, "res3": 8, "res4": 8, "res5": 8}, 16, 8,
                                       num_heads=2, dim_feedforward=32, num_layers=0)
    feats = {f"res{i}": torch.randn(1, 8, 64 // 2 ** i, 64 // 2 ** i) for i in range(2, 6)}
    mask_features, multi_scale = decoder(feats)
    assert mask_features.shape == (1, 8, 16, 16)
    assert [f.shape[-1] for f in multi_scale] == [2, 4, 8]


def test_sine_position_encoding_is_bounded_and_distinct():
    pos = sine_position_encoding(3, 5, 10)
    assert pos.shape == (10, 3, 5)
    assert pos.abs().max() <= 1
    flat = pos.flatten(1).T  # [15, 10]
    assert torch.cdist(flat, flat).add(torch.eye(15)).min() > 1e-3  # every position distinct


# ----------------------------------------------------------------------------- backbone


def test_backbone_weights_load_from_local_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BN statistics, so loading buffers is checked too
        reference.bn1.running_mean.uniform_(-1, 1)
        reference.layer3[0].bn2.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)

    seg = build_segmentor(tiny_config(backbone_weights=str(path)), EMBED_DIM)
    backbone = seg.backbone
    assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(backbone.stem[1].running_mean, reference.bn1.running_mean)
    assert torch.equal(backbone.res4[0].bn2.running_var, reference.layer3[0].bn2.running_var)
    assert torch.equal(backbone.res5[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert isinstance(backbone.stem[1], torchvision.ops.FrozenBatchNorm2d)


def test_backbone_weights_for_another_depth_fail(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ValueError, match="model.backbone_weights"):
        ResNetBackbone("resnet18", weights=path)


def test_missing_backbone_weights_name_the_key(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_segmentor(tiny_config(backbone_weights=str(missing)), EMBED_DIM)
    assert "model.backbone_weights" in str(info.value) and str(missing) in str(info.value)


def test_backbone_weights_are_checked_before_a_run_starts(tmp_path):
    path = tmp_path / "resnet18.pth"
    path.write_bytes(b"weights")  # only that it is there: the worker loads and checks it
    check_weights("resnet18", str(path))
    check_weights("resnet18", None)
    for bad, cause in ((tmp_path / "nope.pth", "does not exist"), (tmp_path, "is not a file")):
        with pytest.raises(ConfigError) as info:
            check_weights("resnet18", str(bad))
        message = str(info.value)
        assert message.startswith(f"model.backbone_weights: backbone weights file '{bad}' {cause}")
        assert "null" in message and "\n" not in message


@pytest.mark.integration  # a splitmatch command in a subprocess
def test_a_missing_backbone_weights_file_is_refused_before_ray(tmp_path):
    from helpers import write_config

    config = write_config(tmp_path, "noweights")
    missing = tmp_path / "missing.pt"
    # A fresh interpreter, so that "Ray was not initialised" means this command started nothing:
    # in this process an earlier test may have connected to the session's cluster.
    probe = ("import sys, ray\n"
             "from splitmatch.cli import main\n"
             f"code = main(['train', {str(config)!r}, '--set', "
             f"'model.backbone_weights={missing}', '--build-pseudo-masks'])\n"
             "print('ray_initialized', ray.is_initialized())\n"
             "sys.exit(code)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"config error: model.backbone_weights: backbone weights file "
                          f"'{missing}' does not exist"), err
    # Refused before Ray, the pseudo-mask cache and the run folder: nothing was started or made.
    assert done.stdout.splitlines()[-1] == "ray_initialized False", done.stdout
    assert not (tmp_path / "runs" / "noweights").exists() and not (tmp_path / "cache").exists()


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    # The file a download would have left: torchvision's name for the resnet18 V1 weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)

    assert imagenet_weights_file("resnet18") == cached
    seg = build_segmentor(tiny_config(backbone_weights="imagenet"), EMBED_DIM)
    assert torch.equal(seg.backbone.res5[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert isinstance(seg.backbone.stem[1], torchvision.ops.FrozenBatchNorm2d)


def test_imagenet_weights_offline_fail_with_one_line(tmp_path, monkeypatch, capsys):
    # Offline for sure: every HTTPS request goes to a loopback port nobody listens on.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{port}")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)  # no toy CLIP cache at hand: the check must come before it
    config = Path(__file__).resolve().parents[1] / "experiments" / "toyworld.yaml"
    code = cli_main(["train", str(config), "--set", "model.backbone_weights=imagenet",
                     "--set", f"train.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "model.backbone_weights" in err and str(expected) in err and "download" in err
    assert not expected.exists() and not (tmp_path / "runs" / "toyworld").exists()


def test_resnet50_forward_and_resnet101_builds():
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(backbone="resnet50", pixel_decoder="fpn"), EMBED_DIM).eval()
    with torch.no_grad():
        out = seg(images(batch=1), class_embeddings())
    assert out["pred_masks"].shape == (1, 8, 16, 16)
    deep = ResNetBackbone("resnet101", norm="gn")
    assert deep.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    assert len(deep.res4) == 23


def test_resnet10_is_resnet18_with_one_block_a_stage_and_has_no_imagenet_weights():
    torch.manual_seed(0)
    short, full = ResNetBackbone("resnet10", norm="gn"), ResNetBackbone("resnet18", norm="gn")
    assert short.out_channels == full.out_channels == {"res2": 64, "res3": 128, "res4": 256,
                                                       "res5": 512}
    assert [len(getattr(short, f"res{i}")) for i in range(2, 6)] == [1, 1, 1, 1]
    features = short(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        k: tuple(v.shape) for k, v in full(torch.randn(1, 3, 64, 64)).items()}
    with pytest.raises(ConfigError) as info:
        imagenet_weights_file("resnet10")
    assert "model.backbone_weights" in str(info.value) and "null" in str(info.value)


# ----------------------------------------------------------------------------- gradients


def total_output(out: dict) -> torch.Tensor:
    total = sum(out[k].sum() for k in ("pred_logits", "pred_masks", "pred_embeds", "mfe_logits"))
    return total + sum(v.sum() for aux in out["aux_outputs"] for v in aux.values())


@pytest.mark.parametrize("decoder", ["msdeform", "fpn"])
def test_gradient_reaches_every_trainable_parameter(decoder):
    torch.manual_seed(0)
    seg = build_segmentor(tiny_config(pixel_decoder=decoder), EMBED_DIM).train()
    params = {n: p for n, p in seg.named_parameters() if p.requires_grad}
    # Deformable attention starts with zero-weight offset/attention projections (Deformable DETR
    # init), so nothing reaches the encoder's query side (positional + level embeddings) on the
    # very first step; one SGD step later every parameter must receive gradient.
    optimizer = torch.optim.SGD(params.values(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        total_output(seg(images(), class_embeddings(batch=2))).backward()
        optimizer.step()
    dead = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient for {dead}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())


# ----------------------------------------------------------------------------- inference


def test_semantic_inference_matches_loop():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    masks = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64)
    seen = [0, 2]
    scores = semantic_inference(logits, masks, (10, 12), seen_class_ids=seen,
                                seen_score_calibration=0.1)
    upsampled = F.interpolate(masks, size=(10, 12), mode="bilinear", align_corners=False)
    expected = torch.zeros(2, 3, 10, 12, dtype=torch.float64)
    for b in range(2):
        for k in range(3):
            for q in range(4):
                prob = torch.sigmoid(logits[b, q, k]) - (0.1 if k in seen else 0.0)
                expected[b, k] += prob * torch.sigmoid(upsampled[b, q])
    assert torch.allclose(scores, expected, atol=1e-12)
    plain = semantic_inference(logits, masks, (10, 12))
    assert torch.all(plain[:, 1] == scores[:, 1]) and torch.all(plain[:, 0] > scores[:, 0])


def test_predict_returns_labels_and_keeps_training_flag(model):
    model.train()
    inference = InferenceConfig(num_random_queries=2, seen_score_calibration=0.1)
    labels = model.predict(images(height=64, width=96), class_embeddings(), inference, [0, 1])
    assert labels.shape == (2, 64, 96) and labels.dtype == torch.long
    assert 0 <= labels.min() and labels.max() < NUM_CLASSES
    assert model.training


def test_slide_windows_match_hand_worked_grids():
    # A VOC-sized image after resizing the short side to 512, ZegCLIP's crop 512 and stride 426:
    # rows fit in one window; columns start at 0 and end flush with the border (683 - 512 = 171).
    assert slide_windows(512, 683, 512, 426) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    # 1000 px: windows at 0 and 426, and a third one ending at the border, starting at 488.
    assert [w[:2] for w in slide_windows(1000, 100, 512, 426)] == [(0, 512), (426, 938), (488, 1000)]
    # A side shorter than the crop is one window over the whole side.
    assert slide_windows(300, 200, 512, 426) == [(0, 300, 0, 200)]
    # Every pixel is covered; columns [0, 512), [426, 938), [438, 950) overlap three deep.
    cover = torch.zeros(600, 950)
    for y1, y2, x1, x2 in slide_windows(600, 950, 512, 426):
        cover[y1:y2, x1:x2] += 1
    assert cover.min() == 1 and cover.max() == 2 * 3


def test_slide_on_an_image_smaller_than_the_window_equals_whole(model):
    x, embeds = images(height=64, width=96), class_embeddings()
    whole = model.predict(x, embeds, InferenceConfig(num_random_queries=2))
    slide = model.predict(x, embeds, InferenceConfig(num_random_queries=2, mode="slide",
                                                     crop_size=128, stride=100))
    assert torch.equal(whole, slide)


def test_slide_averages_the_window_scores(model):
    """Brute force: the scores of each window, pasted and averaged by hand, then argmax."""
    x, embeds = images(batch=1, height=64, width=96, seed=3), class_embeddings()
    inference = InferenceConfig(mode="slide", crop_size=64, stride=32)
    total = torch.zeros(1, NUM_CLASSES, 64, 96)
    count = torch.zeros(64, 96)
    model.eval()
    with torch.no_grad():
        for x1 in (0, 32):  # 96 wide: windows [0, 64) and [32, 96)
            out = model(x[..., x1:x1 + 64], embeds)
            total[..., x1:x1 + 64] += semantic_inference(out["pred_logits"], out["pred_masks"],
                                                         (64, 64))
            count[:, x1:x1 + 64] += 1
    expected = (total / count).argmax(1)
    assert torch.equal(model.predict(x, embeds, inference), expected)


def test_predict_resizes_the_short_side_and_answers_at_input_size(model):
    x, embeds = images(batch=1, height=48, width=72, seed=4), class_embeddings()
    assert resize_short_side(x, 64).shape[-2:] == (64, 96)
    assert torch.equal(resize_short_side(x, 48), x)
    labels = model.predict(x, embeds, InferenceConfig(mode="slide", crop_size=64, stride=48,
                                                      short_side=64))
    assert labels.shape == (1, 48, 72)
    # What the resize does, spelled out: predict at 64x96, then scores back to 48x72.
    model.eval()
    with torch.no_grad():
        big = resize_short_side(x, 64)
        total = torch.zeros(1, NUM_CLASSES, 64, 96)
        count = torch.zeros(64, 96)
        for x1 in (0, 32):
            out = model(big[..., x1:x1 + 64], embeds)
            total[..., x1:x1 + 64] += semantic_inference(out["pred_logits"], out["pred_masks"], (64, 64))
            count[:, x1:x1 + 64] += 1
        scores = F.interpolate(total / count, size=(48, 72), mode="bilinear", align_corners=False)
    assert torch.equal(labels, scores.argmax(1))


# ----------------------------------------------------------------------------- centred classes


def test_predict_classifies_texts_in_the_centered_space():
    """model.center_embeddings: predict centres the texts it is given with the stored seen-text
    mean, i.e. it equals scoring forward's logits against the centred texts by hand."""
    torch.manual_seed(0)
    model = build_segmentor(tiny_config(), EMBED_DIM).eval()
    text = class_embeddings()
    seen = text[:4]
    model.text_center.copy_(F.normalize(seen, dim=-1).mean(0))
    centered = F.normalize(text - seen.mean(0), dim=-1)
    assert torch.allclose(model.class_space(text), centered, atol=1e-6)
    # Centring makes the classes farther apart: their mean pairwise cosine drops.
    off_diagonal = ~torch.eye(NUM_CLASSES, dtype=torch.bool)
    assert (centered @ centered.T)[off_diagonal].mean() < (text @ text.T)[off_diagonal].mean()
    x = images(height=64, width=64)
    with torch.no_grad():
        output = model(x, centered)
    by_hand = semantic_inference(output["pred_logits"], output["pred_masks"], (64, 64)).argmax(1)
    assert torch.equal(model.predict(x, text, InferenceConfig(num_random_queries=0)), by_hand)
    # Uncentred scoring would differ: the centre changes which class wins somewhere.
    with torch.no_grad():
        raw = model(x, text)
    assert not torch.equal(semantic_inference(raw["pred_logits"], raw["pred_masks"],
                                              (64, 64)).argmax(1), by_hand)


def test_a_vocabulary_center_is_the_given_texts_own_mean():
    """inference.text_center: vocabulary centres the texts given at test time on their own mean
    (a centred model only), and predict scores against those."""
    torch.manual_seed(0)
    model = build_segmentor(tiny_config(), EMBED_DIM).eval()
    text = class_embeddings()
    assert torch.equal(model.class_space(text, vocabulary_center=True), model.class_space(text))
    model.text_center.copy_(F.normalize(text[:4], dim=-1).mean(0))
    own = F.normalize(text - F.normalize(text, dim=-1).mean(0), dim=-1)
    assert torch.allclose(model.class_space(text, vocabulary_center=True), own, atol=1e-6)
    assert torch.allclose(own.mean(0), torch.zeros(EMBED_DIM), atol=0.1)
    x = images(height=64, width=64)
    with torch.no_grad():
        output = model(x, own)
    by_hand = semantic_inference(output["pred_logits"], output["pred_masks"], (64, 64)).argmax(1)
    inference = InferenceConfig(num_random_queries=0, text_center="vocabulary")
    assert torch.equal(model.predict(x, text, inference), by_hand)


def test_text_center_is_saved_and_old_checkpoints_load_uncentered():
    torch.manual_seed(0)
    model = build_segmentor(tiny_config(), EMBED_DIM)
    model.text_center.copy_(torch.full((EMBED_DIM,), 0.1))
    state = model.state_dict()
    fresh = build_segmentor(tiny_config(), EMBED_DIM)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.text_center, model.text_center)
    # A checkpoint from before the option has no centre: it loads as zero, i.e. uncentred.
    del state["text_center"]
    fresh.load_state_dict(state)
    assert torch.equal(fresh.text_center, torch.zeros(EMBED_DIM))
    text = class_embeddings()
    assert torch.allclose(fresh.class_space(text), text, atol=1e-6)
