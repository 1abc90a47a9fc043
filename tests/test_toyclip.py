"""The toy CLIP: captions, loss, a few-step pretraining, its cache, loading through build_clip, the
compact shipped weights and the golden outputs that stand for its key's format."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import RECIPE
from toy_clip_golden import GOLDEN, TOLERANCE, golden_outputs, shipped_clip, toy_config
from splitmatch import toyclip
from splitmatch.clip import TEMPLATES, build_clip
from splitmatch.config import (
    ClipConfig,
    Config,
    DataConfig,
    PseudoMaskConfig,
    ToyClipConfig,
    ToyWorldConfig,
)
from splitmatch.data import render
from splitmatch.files import remove_stale
from splitmatch.toyclip.captions import caption_words
from splitmatch.toyclip.compact import (EMBEDDING, compact_state_dict, expand_state_dict,
                                        stand_in_rows, toy_vocabulary)
from splitmatch.toyclip.training import batches_in_rounds
from splitmatch.toyclip import (
    BACKGROUND_TEMPLATES,
    CLASS_NAMES,
    TOY_CLIP_FORMAT,
    ToyClipRecipe,
    checkpoint_dir,
    checkpoint_info,
    checkpoint_inputs,
    checkpoint_key,
    contrastive_loss,
    jaccard_targets,
    make_caption,
    toy_clip_checkpoint,
    training_batch,
    training_sample,
    visible_classes,
)



def named_classes(caption: str) -> set[int]:
    """The class ids whose names occur as words in `caption` (no toy class name contains another)."""
    return {c for c, name in enumerate(CLASS_NAMES) if re.search(rf"\b{name}\b", caption)}


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory) -> ToyClipConfig:
    return ToyClipConfig(steps=3, batch_size=8, lr=1e-3, seed=0,
                         cache_dir=str(tmp_path_factory.mktemp("toy_clip")))


@pytest.fixture(scope="module")
def built(toy_cfg):
    """(checkpoint path, log lines) of one real pretraining into an empty cache."""
    lines: list[str] = []
    path = toy_clip_checkpoint(toy_cfg, log=lines.append, recipe=RECIPE)
    return path, lines


# ----------------------------------------------------------------------------- captions and data


def test_caption_names_exactly_the_given_classes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        count = int(rng.integers(1, 5))
        classes = rng.choice(len(CLASS_NAMES), size=count, replace=False).tolist()
        caption = make_caption(classes, rng)
        assert named_classes(caption) == set(classes), caption
    assert make_caption([9], np.random.default_rng(1)).count("ice cube") == 1
    with pytest.raises(ValueError):
        make_caption([], rng)


def test_training_sample_caption_names_exactly_the_visible_classes():
    recipe = ToyClipRecipe(zoom_fraction=0.5, single_zoom_fraction=0.5)
    min_pixels = int(np.ceil(recipe.min_visible_fraction * 64 * 64))
    kinds, blacked = set(), set()
    for index in range(160):
        sample = training_sample(np.random.SeedSequence([3, index]), 64, recipe)
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert sample.classes == visible_classes(sample.label, min_pixels)
        assert named_classes(sample.caption) == set(sample.classes), sample.caption
        if not sample.classes:  # an object-free picture, captioned as background
            assert sample.caption in BACKGROUND_TEMPLATES and (sample.label == 255).all()
        kinds.add(min(len(sample.classes), 2))
        if (sample.image == 0).all(-1).mean() > 0.1:  # blacked out, as masked CLS inputs are
            blacked.add(min(len(sample.classes), 2))
    assert kinds == {0, 1, 2}  # background, single-class and scene captions all occur
    assert blacked == {0, 1}  # masked backgrounds and single objects on black both occur


def test_visible_classes_ignores_background_and_slivers():
    label = np.full((8, 8), 255, dtype=np.uint8)
    label[:2, :2] = 3   # 4 pixels
    label[5, 5] = 7     # 1 pixel
    assert visible_classes(label) == [3, 7]
    assert visible_classes(label, min_pixels=2) == [3]
    _, rendered = render(5, 64, 3, [0, 4, 9])
    assert set(visible_classes(rendered)) <= {0, 4, 9}


def test_training_batch_is_a_pure_function_of_seed_and_step():
    images, captions, sets = training_batch(0, 5, 6, 64)
    again = training_batch(0, 5, 6, 64)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, again[0]) and captions == again[1] and torch.equal(sets, again[2])
    assert not torch.equal(images, training_batch(0, 6, 6, 64)[0])
    assert not torch.equal(images, training_batch(1, 5, 6, 64)[0])
    assert sets.shape == (6, len(CLASS_NAMES) + 1)
    for caption, row in zip(captions, sets):
        assert named_classes(caption) == set(row[:-1].nonzero().flatten().tolist())
        assert bool(row[-1]) == (caption in BACKGROUND_TEMPLATES) != bool(row[:-1].any())


def test_batches_drawn_in_rounds_by_two_processes_are_the_batches_in_step_order(toy_cfg):
    cfg = dataclasses.replace(toy_cfg, steps=5, batch_size=3)
    drawn = list(batches_in_rounds(cfg, RECIPE, processes=2, round_size=2))
    assert len(drawn) == 5
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    for step, (images, tokens, sets) in enumerate(drawn):
        expected = training_batch(cfg.seed, step, 3, cfg.image_size, RECIPE)
        assert torch.equal(images, expected[0]) and torch.equal(sets, expected[2])
        assert torch.equal(tokens, tokenizer(expected[1]))
    alone = list(batches_in_rounds(cfg, RECIPE, processes=1))
    assert all(torch.equal(a, b) for one, two in zip(alone, drawn) for a, b in zip(one, two))


# ----------------------------------------------------------------------------- loss


def test_jaccard_targets():
    sets = torch.zeros(4, 10, dtype=torch.bool)
    sets[0, [1]] = sets[1, [2]] = sets[2, [1]] = True
    sets[3, [1, 2]] = True
    targets = jaccard_targets(sets)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    # Image 0 (class 1): full credit to captions 0 and 2 (also class 1), half to caption 3.
    assert torch.allclose(targets[0], torch.tensor([1.0, 0.0, 1.0, 0.5]) / 2.5)
    distinct = torch.eye(10, dtype=torch.bool)[:5]
    assert torch.equal(jaccard_targets(distinct), torch.eye(5))


def test_contrastive_loss_is_clip_loss_for_distinct_captions():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    reference = (F.cross_entropy(logits, torch.arange(5)) +
                 F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert torch.allclose(contrastive_loss(image, text, scale, torch.eye(5)), reference)


# ----------------------------------------------------------------------------- pretraining + cache


def test_checkpoint_is_published_complete_and_loads_with_identical_outputs(built, toy_cfg):
    path, lines = built
    folder = checkpoint_dir(toy_cfg, RECIPE)
    assert path == folder / toyclip.CHECKPOINT_NAME and path.is_file()
    assert sorted(p.name for p in folder.iterdir()) == [toyclip.INFO_NAME, toyclip.CHECKPOINT_NAME]
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    assert any("pretraining" in line for line in lines)

    info = checkpoint_info(path)
    assert info["key"] == folder.name == checkpoint_key(toy_cfg, RECIPE)
    assert info["inputs"]["toy_clip"]["steps"] == 3 and "cache_dir" not in info["inputs"]["toy_clip"]
    assert 0.0 <= info["zero_shot"]["accuracy"] <= 1.0
    assert set(info["zero_shot"]["per_class"]) == set(CLASS_NAMES)

    # Same seed, same weights: retrain in memory and compare with what build_clip loaded.
    model, _ = toyclip.train_toy_clip(toy_cfg, RECIPE, log=lambda _: None)
    clip = build_clip(ClipConfig(model_name=toy_cfg.model_name, pretrained=str(path)))
    loaded = clip.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name

    images, _, _ = training_batch(7, 0, 4, 64)
    with torch.no_grad():
        pixels = (images.float() / 255.0 - clip.mean) / clip.std
        expected_images = model.encode_image(pixels, normalize=True)
        tokens = clip.tokenizer([TEMPLATES["single"][0].format(n) for n in CLASS_NAMES])
        expected_text = model.encode_text(tokens, normalize=True)
    assert torch.allclose(clip.encode_images(images), expected_images, atol=1e-6)
    assert torch.allclose(clip.text_embeddings(CLASS_NAMES, TEMPLATES["single"]), expected_text,
                          atol=1e-6)


def test_second_call_is_a_cache_hit(built, toy_cfg, monkeypatch):
    path, _ = built
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint must not be retrained")

    monkeypatch.setattr(toyclip.checkpoint, "train_toy_clip", no_training)
    lines: list[str] = []
    assert toy_clip_checkpoint(toy_cfg, log=lines.append, recipe=RECIPE) == path
    assert toy_clip_checkpoint(toy_cfg, build=False, log=lines.append, recipe=RECIPE) == path
    assert path.stat().st_mtime_ns == mtime
    assert all("cached" in line for line in lines)


def test_key_follows_every_training_input_but_not_the_cache_folder(toy_cfg, monkeypatch):
    key = checkpoint_key(toy_cfg, RECIPE)
    for change in ({"seed": 1}, {"steps": 4}, {"batch_size": 16}, {"lr": 2e-3},
                   {"image_size": 32}):
        assert checkpoint_key(dataclasses.replace(toy_cfg, **change), RECIPE) != key, change
    assert checkpoint_key(dataclasses.replace(toy_cfg, cache_dir="elsewhere"), RECIPE) == key
    assert checkpoint_key(toy_cfg, dataclasses.replace(RECIPE, zoom_fraction=0.0)) != key
    with pytest.raises(Exception, match="no model config"):
        checkpoint_key(dataclasses.replace(toy_cfg, model_name="no-such-model"), RECIPE)
    # What the weights are, not what made them: the format version stands for the toy world and
    # the training code (guarded by the golden tests below), so a docstring edit or another build
    # of the same torch keeps the key, and with it the shipped weights.
    inputs = checkpoint_inputs(toy_cfg, RECIPE)
    assert set(inputs) == {"format", "toy_clip", "model_config", "recipe", "templates"}
    assert inputs["format"] == TOY_CLIP_FORMAT
    monkeypatch.setattr(torch, "__version__", "2.14.1+cpu")
    monkeypatch.setattr(open_clip, "__version__", "3.3.1")
    assert checkpoint_key(toy_cfg, RECIPE) == key
    monkeypatch.setattr(toyclip.checkpoint, "TOY_CLIP_FORMAT", TOY_CLIP_FORMAT + 1)
    assert checkpoint_key(toy_cfg, RECIPE) != key


def test_interrupted_pretraining_leaves_nothing_that_looks_complete(toy_cfg, monkeypatch):
    cfg = dataclasses.replace(toy_cfg, seed=11)
    folder = checkpoint_dir(cfg, RECIPE)

    def interrupted(*args, **kwargs):  # after the weights are written, before publishing
        raise KeyboardInterrupt

    monkeypatch.setattr(toyclip.checkpoint, "zero_shot_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        toy_clip_checkpoint(cfg, log=lambda _: None, recipe=RECIPE)
    assert not folder.exists()
    assert not list(folder.parent.glob(f".{folder.name}.*"))
    # A half-built folder of a dead process (kill -9) is never taken for a checkpoint ...
    stale = folder.parent / f".{folder.name}.999999999.tmp"
    stale.mkdir()
    (stale / toyclip.CHECKPOINT_NAME).write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="splitmatch toy-clip"):
        toy_clip_checkpoint(cfg, build=False, recipe=RECIPE)
    # ... and is cleared by the next build.
    assert remove_stale(folder.parent, f".{folder.name}.*.tmp") == 1
    assert not stale.exists()


def test_zero_shot_accuracy_and_pseudo_mask_quality_run(built, toy_cfg):
    path, _ = built
    clip = build_clip(ClipConfig(model_name=toy_cfg.model_name, pretrained=str(path)))
    accuracy = toyclip.zero_shot_accuracy(clip, num_images=20, seed=0, image_size=64)
    assert 0.0 <= accuracy <= 1.0
    report = toyclip.zero_shot_report(clip, num_images=20, seed=0, image_size=64)
    confusion = torch.tensor(report["confusion"])  # rows: true class, 2 images each
    assert confusion.sum(1).tolist() == [2] * 10
    assert confusion.diag().sum().item() / 20 == pytest.approx(report["accuracy"]) == accuracy
    for c, name in enumerate(CLASS_NAMES):
        assert confusion[c, c].item() / 2 == pytest.approx(report["per_class"][name])
    images, targets = toyclip.zero_shot_images(20, 0, 64)
    assert targets.tolist() == [i % 10 for i in range(20)]
    # Held out: no evaluation image equals a training image of the same seed.
    assert not torch.equal(images[:8], training_batch(0, 0, 8, 64)[0])

    data = DataConfig(dataset="toyworld", toyworld=ToyWorldConfig(num_train=4, num_val=2))
    pseudo = PseudoMaskConfig(scales=[6, 8, 10], min_area=32, image_size=128, batch_size=4)
    quality = toyclip.pseudo_mask_quality(clip, pseudo, data, num_images=4)
    assert quality["images"] == 4 and 0.0 <= quality["best_match_iou"] <= 1.0
    assert 0.0 <= quality["candidate_class_accuracy"] <= 1.0


def test_main_toy_clip_reports_path_and_accuracy(built, toy_cfg):
    path, _ = built
    cfg = Config(toy_clip=toy_cfg,
                 data=DataConfig(dataset="toyworld", toyworld=ToyWorldConfig(num_train=4)),
                 pseudo_masks=PseudoMaskConfig(scales=[6, 8, 10], min_area=32, image_size=128,
                                               batch_size=4))
    lines: list[str] = []
    summary = toyclip.main_toy_clip(cfg, log=lines.append, quality_images=4, recipe=RECIPE)
    text = "\n".join(lines)
    assert summary["checkpoint"] == str(path) and str(path) in text
    assert "zero-shot accuracy" in text and all(name in text for name in CLASS_NAMES)
    assert summary["pseudo_mask_quality"]["images"] == 4
    assert os.path.isfile(summary["checkpoint"])
    assert json.loads(lines[-1]) == json.loads(json.dumps(summary))  # the last line, for scripts


def test_a_resolved_toy_clip_is_pinned_by_its_weights_not_its_key(tmp_path):
    """Two kinds of CPU build different weights under one key: the resolved config carries the
    weights' sha256, so a run or pseudo-mask cache made with the other weights is not reused and
    a replaced file is refused when it is loaded."""
    import yaml

    from splitmatch.config import ConfigError, config_from_dict, dump_config, to_dict
    from splitmatch.files import file_sha256
    from splitmatch.pseudo.cache import cache_key
    from splitmatch.toyclip import with_toy_clip
    from splitmatch.checkpoints import check_run_config

    data = to_dict(Config())
    data["clip"]["pretrained"] = "toy"
    data["toy_clip"].update(steps=2, batch_size=8, cache_dir=str(tmp_path / "toy"))
    cfg = config_from_dict(data)
    first = with_toy_clip(cfg, log=lambda _: None)
    path = Path(first.clip.pretrained)
    assert first.clip.sha256 == file_sha256(path)
    build_clip(first.clip)  # the hash is checked on loading, and holds
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(first))
    assert check_run_config(run_dir, first) == {}

    # The same key, other weights: what another machine's build of this toy CLIP looks like.
    state = torch.load(path)
    state = {k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, path)
    with pytest.raises(ConfigError, match="these are other weights") as info:
        build_clip(first.clip)
    assert str(path) in str(info.value) and first.clip.sha256 in str(info.value)
    second = with_toy_clip(cfg, log=lambda _: None)
    assert second.clip.pretrained == first.clip.pretrained
    assert second.clip.sha256 == file_sha256(path) != first.clip.sha256
    with pytest.raises(ConfigError, match=r"another config \(clip\.sha256"):
        check_run_config(run_dir, second)
    assert cache_key(second, "train") != cache_key(first, "train")

    # The contents name the pseudo-mask cache: the same weights elsewhere share it.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    moved = config_from_dict({**to_dict(second), "clip": {**to_dict(second)["clip"],
                                                          "pretrained": str(copy)}})
    assert cache_key(moved, "train") == cache_key(second, "train")

    # A run stored before the key existed reads as unpinned: a file-path run still resumes.
    unpinned = to_dict(second)
    del unpinned["clip"]["sha256"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(unpinned))
    assert check_run_config(run_dir, config_from_dict(unpinned)) == {}
    with pytest.raises(ConfigError, match="clip.sha256"):
        check_run_config(run_dir, second)
    with pytest.raises(ConfigError, match="'clip.sha256' is set but 'clip.pretrained'"):
        build_clip(ClipConfig(model_name="splitmatch-tiny-vit", pretrained=None, sha256="0" * 64))


def test_the_toy_configs_toy_clip_comes_with_the_package(tmp_path, monkeypatch):
    """The toy config's toy CLIP is shipped under its key: an empty cache gets a copy that loads,
    with no pretraining; `shipped=False` (`splitmatch toy-clip --pretrain`) leaves it out."""
    from splitmatch.config import load_config
    from splitmatch.demo import DEMO_CONFIG
    from splitmatch.toyclip.checkpoint import CHECKPOINT_NAME, INFO_NAME, SHIPPED

    toy = load_config(DEMO_CONFIG, [f"toy_clip.cache_dir={tmp_path / 'cache'}"]).toy_clip
    key = checkpoint_key(toy)
    # Fails when TOY_CLIP_FORMAT, the toy config's section or the recipe change: the shipped
    # weights were made another way. Rebuild them (`splitmatch toy-clip experiments/toyworld.yaml
    # --pretrain`), ship the new key's folder (`python -m splitmatch.toyclip.ship CACHE/KEY`)
    # instead of the old one, and record its golden outputs (tests/toy_clip_golden.py).
    assert [folder.name for folder in SHIPPED.iterdir()] == [key]
    assert json.loads((SHIPPED / key / INFO_NAME).read_text())["key"] == key
    shipped_bytes = sum(path.stat().st_size for path in (SHIPPED / key).iterdir())
    assert shipped_bytes < 5_000_000, shipped_bytes

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped toy CLIP must not be pretrained again")

    monkeypatch.setattr(toyclip.checkpoint, "train_toy_clip", no_training)
    lines: list[str] = []
    path = toy_clip_checkpoint(toy, log=lines.append)
    assert path == tmp_path / "cache" / key / CHECKPOINT_NAME
    assert "comes with splitmatch" in lines[0] and "using cached checkpoint" in lines[1]
    # Expanded to the same bytes by every install: `clip.sha256` pins runs to this file, so two
    # machines (or two caches) must agree on it.
    again = toy_clip_checkpoint(dataclasses.replace(toy, cache_dir=str(tmp_path / "again")),
                                log=lines.append)
    assert again != path and again.read_bytes() == path.read_bytes()
    clip = build_clip(ClipConfig(model_name=toy.model_name, pretrained=str(path)))
    assert clip.text_embeddings(["leaf"], ["a photo of a {}."]).shape[0] == 1
    with pytest.raises(AssertionError, match="must not be pretrained"):
        toy_clip_checkpoint(dataclasses.replace(toy, cache_dir=str(tmp_path / "other")),
                            log=lines.append, shipped=False)


# ----------------------------------------------------------------------------- shipped weights


def test_shipped_toy_clip_gives_its_golden_outputs(tmp_path):
    """The shipped weights, expanded as a first run expands them, give the outputs recorded from
    the full 29 MB build they were made from (tests/golden/toy_clip_outputs.pt), to TOLERANCE,
    on every toy template, caption form and class name, on single objects and a scene: image
    embeddings, dense features, masked CLS. Fails when the weights, the format or a library
    changes what the toy CLIP computes."""
    golden = torch.load(GOLDEN, weights_only=True)
    toy = toy_config(tmp_path)
    # Recorded for these weights: a new build is recorded anew (tests/toy_clip_golden.py).
    assert golden["key"] == checkpoint_key(toy)
    clip = build_clip(shipped_clip(toy))
    outputs = golden_outputs(clip, golden["inputs"])
    assert outputs.keys() == golden["outputs"].keys()
    for name, expected in golden["outputs"].items():
        torch.testing.assert_close(outputs[name], expected, rtol=0, atol=TOLERANCE, msg=name)
    # The inputs name every class, every single-object and scene template and every background
    # caption, so each token row the toy vocabulary has is read.
    tokens = set(clip.tokenizer(golden["inputs"]["prompts"] + [
        template.format(name) for template in toyclip.SINGLE_TEMPLATES for name in CLASS_NAMES
    ]).unique().tolist())
    assert tokens == set(toy_vocabulary(clip.tokenizer).tolist())


def test_compact_weights_keep_every_toy_prompt_and_rebuild_the_rest(built, toy_cfg):
    path, _ = built
    clip = build_clip(ClipConfig(model_name=toy_cfg.model_name, pretrained=str(path)))
    state = torch.load(path, weights_only=True)
    vocab_size = state[EMBEDDING].shape[0]
    # Only the token embedding spans the vocabulary (no tied output projection), so its unread
    # rows reach no output.
    assert [name for name, t in state.items() if vocab_size in t.shape] == [EMBEDDING]
    rows = toy_vocabulary(clip.tokenizer)
    # Every prompt the toy config gives it: templates, class names, background prompts.
    from splitmatch.demo import DEMO_CONFIG
    from splitmatch.config import load_config
    cfg = load_config(DEMO_CONFIG)
    prompts = [t.format(n) for t in TEMPLATES[cfg.clip.templates] for n in CLASS_NAMES]
    assert set(clip.tokenizer(prompts + cfg.pseudo_masks.background_prompts).unique().tolist()) \
        <= set(rows.tolist())

    compact = compact_state_dict(state, rows)
    expanded = expand_state_dict(compact)
    assert list(expanded) == list(state)
    for name, tensor in state.items():
        if name != EMBEDDING:
            assert torch.equal(expanded[name], tensor), name
    assert torch.equal(expanded[EMBEDDING][rows], state[EMBEDDING][rows])
    # The other rows: the same noise each time, of the std the unread rows had.
    assert torch.equal(expand_state_dict(compact)[EMBEDDING], expanded[EMBEDDING])
    assert torch.equal(stand_in_rows(4, 3, 0.02), stand_in_rows(4, 3, 0.02))
    unread = torch.ones(vocab_size, dtype=torch.bool)
    unread[rows] = False
    assert expanded[EMBEDDING][unread].std().item() == pytest.approx(
        state[EMBEDDING][unread].std().item(), rel=1e-3)

    rebuilt = build_clip(ClipConfig(model_name=toy_cfg.model_name, pretrained=None))
    rebuilt.model.load_state_dict(expanded, strict=True)
    words = caption_words()
    assert torch.equal(rebuilt.prompt_embeddings(words), clip.prompt_embeddings(words))
    # Words outside the toy vocabulary read stand-ins: still one embedding per word.
    others = rebuilt.prompt_embeddings(["a photo of a cat.", "a photo of a dog."])
    assert not torch.allclose(others[0], others[1], atol=1e-3)


# What a 3-step pretraining (the `built` fixture: seed 0, batches of 8, RECIPE) logs under
# TOY_CLIP_FORMAT: its data (toy world, captions), initialisation, loss and optimiser in four
# numbers. A change to any of them fails here: bump TOY_CLIP_FORMAT (the cache then retrains
# rather than reusing weights made the old way), rebuild and ship the toy config's toy CLIP, and
# record these again. Other CPUs and thread counts agree to about 1e-7.
GOLDEN_TRAINING = {"format": 2, "loss": [2.2035332918167114, 3.416179895401001],
                   "logit_scale": [14.257251739501953, 14.251144409179688]}


def test_a_short_pretraining_matches_the_golden_run_of_its_format(built):
    path, _ = built
    history = checkpoint_info(path)["history"]
    assert TOY_CLIP_FORMAT == GOLDEN_TRAINING["format"]
    assert [entry["step"] for entry in history] == [2, 3]
    assert [entry["loss"] for entry in history] == pytest.approx(GOLDEN_TRAINING["loss"], rel=1e-4)
    assert [entry["logit_scale"] for entry in history] == pytest.approx(
        GOLDEN_TRAINING["logit_scale"], rel=1e-4)


def test_ship_writes_the_compact_build_of_a_cache_folder(built, tmp_path):
    """`python -m splitmatch.toyclip.ship CACHE/KEY`: the folder's build, compact, under its key,
    expanding to the build's weights on every toy row."""
    from splitmatch.toyclip.compact import COMPACT_NAME, load_compact
    from splitmatch.toyclip.ship import ship_checkpoint

    path, _ = built
    target = ship_checkpoint(path.parent, shipped=tmp_path / "shipped")
    assert target == tmp_path / "shipped" / path.parent.name
    assert sorted(p.name for p in target.iterdir()) == [COMPACT_NAME, toyclip.INFO_NAME]
    info = json.loads((target / toyclip.INFO_NAME).read_text())
    assert info["key"] == path.parent.name and info["shipped"]["token_rows"] == 44
    assert (target / COMPACT_NAME).stat().st_size < path.stat().st_size / 6
    compact = load_compact(target / COMPACT_NAME)
    state = torch.load(path, weights_only=True)
    rows = compact["token_rows"]
    assert torch.equal(expand_state_dict(compact)[EMBEDDING][rows], state[EMBEDDING][rows])

    misnamed = tmp_path / "not-the-key"
    misnamed.mkdir()
    for name in (toyclip.CHECKPOINT_NAME, toyclip.INFO_NAME):
        (misnamed / name).write_bytes((path.parent / name).read_bytes())
    with pytest.raises(ValueError, match="names key"):
        ship_checkpoint(misnamed, shipped=tmp_path / "shipped")
