from pathlib import Path

import pytest
import yaml

from splitmatch.config import (Config, ConfigError, config_from_dict, dump_config, flatten,
                               load_config)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


SHIPPED = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_roundtrip(name, tmp_path):
    cfg = load_config(EXPERIMENTS / f"{name}.yaml")
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_paper_settings():
    voc = load_config(EXPERIMENTS / "voc_preset.yaml")
    coco = load_config(EXPERIMENTS / "coco_stuff_preset.yaml")
    for cfg in (voc, coco, load_config(EXPERIMENTS / "voc_paper.yaml"),
                load_config(EXPERIMENTS / "coco_stuff_paper.yaml")):
        assert cfg.model.backbone == "resnet101"
        assert cfg.model.num_seen_queries == 100
        assert cfg.train.batch_size == 16
        assert cfg.clip.model_name == "ViT-B-16"
        assert cfg.model.backbone_weights == "imagenet"  # Mask2Former starts from ImageNet, frozen BN
        assert (cfg.inference.mode, cfg.inference.short_side, cfg.inference.crop_size,
                cfg.inference.stride) == ("slide", 512, 512, 426)  # ZegCLIP's test protocol
    assert voc.train.max_iters == 20000 and coco.train.max_iters == 80000
    # The paper's ablation setting (Sec. 4.2): COCO-Stuff 156/15, ResNet-50, 40k iterations.
    r50 = load_config(EXPERIMENTS / "coco_stuff_r50_paper.yaml")
    assert (r50.model.backbone, r50.train.max_iters, r50.data.dataset) == (
        "resnet50", 40000, "coco_stuff")
    assert flatten(r50) == {**flatten(load_config(EXPERIMENTS / "coco_stuff_paper.yaml")),
                            "name": "coco_stuff_r50_paper", "model.backbone": "resnet50",
                            "train.max_iters": 40000, "tracking.experiment": "coco_stuff_r50_paper"}


@pytest.mark.parametrize("preset, paper", [("toyworld", "toyworld_paper"),
                                           ("voc_preset", "voc_paper"),
                                           ("coco_stuff_preset", "coco_stuff_paper")])
def test_the_paper_preset_is_ours_with_every_deviation_switched_off(preset, paper):
    """Each `*_paper.yaml` runs the method as the paper states it; it differs from the project's
    preset in exactly the deviations the ablation's deviations table switches off one by one."""
    from splitmatch.ablation import PAPER_OVERRIDES
    ours = load_config(EXPERIMENTS / f"{preset}.yaml")
    theirs = load_config(EXPERIMENTS / f"{paper}.yaml")
    as_paper = flatten(load_config(EXPERIMENTS / f"{preset}.yaml", PAPER_OVERRIDES))
    assert {k: v for k, v in flatten(theirs).items() if k not in ("name", "tracking.experiment")} \
        == {k: v for k, v in as_paper.items() if k not in ("name", "tracking.experiment")}
    assert (theirs.loss.candidate_negatives, theirs.pseudo_masks.cls_input,
            theirs.model.center_embeddings, theirs.pseudo_masks.background_prompts,
            theirs.loss.normalization, theirs.inference.seen_score_calibration) == (
        "all", "masked", False, [], "joint", 0.0)
    if preset == "toyworld":  # every deviation is one the toy preset takes
        differ = {k for k, v in flatten(ours).items() if as_paper[k] != v}
        assert differ >= {"loss.candidate_negatives", "pseudo_masks.cls_input",
                          "model.center_embeddings", "pseudo_masks.background_prompts",
                          "loss.normalization", "inference.seen_score_calibration"}


def test_overrides_are_typed(tmp_path):
    path = EXPERIMENTS / "toyworld.yaml"
    cfg = load_config(path, ["model.num_candidate_queries=3", "pseudo_masks.scales=[2, 5]",
                             "model.mfe.norm=bn", "data.unseen=[lemon]", "seed=7"])
    assert cfg.model.num_candidate_queries == 3
    assert cfg.pseudo_masks.scales == [2, 5]
    assert cfg.model.mfe.norm == "bn"
    assert cfg.data.unseen == ["lemon"]
    assert cfg.seed == 7


def test_floats_take_scientific_notation_and_refuse_non_finite_values():
    path = EXPERIMENTS / "toyworld.yaml"
    # YAML 1.1 reads these as strings; a float field takes them as the numbers they are.
    cfg = load_config(path, ["optim.lr=1e-4", "optim.weight_decay=5E-2", "loss.focal_alpha=.25"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.focal_alpha) == (1e-4, 5e-2, 0.25)
    for value in (".nan", ".inf", "-.inf", "nan", "1e999"):
        with pytest.raises(ConfigError, match="'optim.lr' must be a finite number"):
            load_config(path, [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match="'optim.lr' must be a number, got 'fast'"):
        load_config(path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="'model.hidden_dim' must be an integer, got '1e2'"):
        load_config(path, ["model.hidden_dim=1e2"])  # integers stay exact


@pytest.mark.parametrize("override, key", [
    ("model.num_seen_queries=-4", "model.num_seen_queries"),
    ("model.num_candidate_queries=-1", "model.num_candidate_queries"),
    ("model.nonsense=1", "model.nonsense"),
    ("model.hidden_dim=abc", "model.hidden_dim"),
    ("model.mfe.norm=layer", "model.mfe.norm"),
    ("data.unseen=[unicorn]", "data.unseen"),
    ("train.use_gpu=7", "train.use_gpu"),
    ("pseudo_masks.scales=[]", "pseudo_masks.scales"),
    ("pseudo_masks.merge_threshold=2.0", "pseudo_masks.merge_threshold"),
    ("inference.stride=600", "inference.stride"),
    ("inference.mode=tiles", "inference.mode"),
    ("inference.short_side=0", "inference.short_side"),
    ("name=../x", "name"),  # run names are folders under train.storage_path: no paths
    ("name=a/b", "name"),
    ("name=..", "name"),
    ("loss.candidate_pool=everything", "loss.candidate_pool"),
    ("loss.candidate_pool_max_cosine=1.5", "loss.candidate_pool_max_cosine"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("loss.cosine_balance=rare", "loss.cosine_balance"),
    ("train.ema_decay=-0.1", "train.ema_decay"),
])
def test_bad_values_name_key_and_file(override, key):
    path = EXPERIMENTS / "toyworld.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert key in str(err.value)
    assert "toyworld.yaml" in str(err.value)


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_seen_queries: 10\ntrainer:\n  max_iters: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'trainer'"):
        load_config(path)


def test_missing_file_named():
    with pytest.raises(ConfigError, match="does_not_exist.yaml"):
        load_config("does_not_exist.yaml")


def test_unseen_must_leave_a_seen_class():
    from splitmatch.splits import TOYWORLD_CLASSES
    with pytest.raises(ConfigError, match="no seen class"):
        config_from_dict({"data": {"unseen": list(TOYWORLD_CLASSES)}})


def test_defaults_and_flatten():
    cfg = config_from_dict({})
    assert cfg == Config()
    flat = flatten(cfg)
    assert flat["model.num_seen_queries"] == 100
    assert flat["model.mfe.norm"] == "gn"
    assert yaml.safe_load(dump_config(cfg))["matching"]["mode"] == "split"


def test_dense_candidate_embeddings_need_the_mfe():
    with pytest.raises(ConfigError, match="model.candidate_embedding"):
        load_config(EXPERIMENTS / "toyworld.yaml",
                    ["model.candidate_embedding=dense", "model.mfe.enabled=false"])
    cfg = load_config(EXPERIMENTS / "toyworld.yaml", ["model.candidate_embedding=dense_mlp"])
    assert cfg.model.candidate_embedding == "dense_mlp"
    # The batch pool pools CLIP's Cu, which the dense embeddings replace.
    with pytest.raises(ConfigError, match="'loss.candidate_pool' batch pools CLIP's Cu"):
        load_config(EXPERIMENTS / "toyworld.yaml",
                    ["model.candidate_embedding=dense", "loss.candidate_pool=batch"])


def test_a_stored_config_with_a_merged_key_reads_as_today_or_is_refused_by_name(tmp_path):
    from splitmatch.config import config_differences, retire_keys, stored_config_data, to_dict
    stored = to_dict(Config())
    stored["matching"]["num_points"] = stored["loss"]["num_points"]
    del stored["loss"]["normalization"]  # a run from before per-group normalisation existed
    del stored["model"]["center_embeddings"]  # ... and before centred classes
    assert "num_points" not in retire_keys(stored, "run")["matching"]
    assert config_differences(stored, Config()) == {}
    assert "loss.normalization" in config_differences(
        stored, config_from_dict({"loss": {"normalization": "per_group"}}))
    assert stored_config_data(stored, "run")["loss"]["normalization"] == "joint"
    assert stored_config_data(stored, "run")["model"]["center_embeddings"] is False
    assert "model.center_embeddings" in config_differences(
        stored, config_from_dict({"model": {"center_embeddings": True}}))
    # A run's own config.yaml is read the same way by every command that takes CONFIG.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stored))
    assert load_config(path) == Config()
    stored["matching"]["num_points"] = 7
    path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match="'matching.num_points' \\(7\\) differs from "
                                          "'loss.num_points'"):
        load_config(path)
    # A removed option reads as today's code when it asked for what the code still does.
    stored["matching"]["num_points"] = stored["loss"]["num_points"]
    stored["model"]["candidate_head"] = False
    path.write_text(yaml.safe_dump(stored))
    assert load_config(path) == Config()
    stored["model"]["candidate_head"] = True
    path.write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigError, match="'model.candidate_head' was removed"):
        load_config(path)
