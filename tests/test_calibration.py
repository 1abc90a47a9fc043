"""The test-time seen-score calibration chosen on the selection split (calibration.py): one
forward pass scored at several values equals a pass per value, the choice's rules, the config
keys, and a tiny run with `auto` end to end."""
import json
import math

import pytest
import torch
import yaml

from helpers import SHORT, TINY, finish, splitmatch, the_run, write_config
from splitmatch.calibration import (choose_calibration, evaluate, evaluate_calibrations,
                                    fixed_at)
from splitmatch.clip import TEMPLATES, build_clip
from splitmatch.config import (ConfigError, InferenceConfig, config_differences,
                               config_from_dict, load_config, stored_config_data, to_dict)
from splitmatch.data import build_dataset
from splitmatch.model import build_segmentor
from splitmatch.splits import TOYWORLD_CLASSES, seen_ids, unseen_ids
from splitmatch.targets import seen_lookup
from splitmatch.checkpoints import CALIBRATION
from splitmatch.engine import ClassSpace

GRID = [0.0, 0.05, 0.1, 0.15, 0.2]


@pytest.fixture(scope="module")
def tiny():
    """(model, classes, test split) of the tiny test model with random weights."""
    torch.manual_seed(0)
    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "toyworld": {
        **TINY["data"]["toyworld"], "num_test": 3}}})
    clip = build_clip(cfg.clip)
    seen, unseen = seen_ids("toyworld"), unseen_ids("toyworld")
    classes = ClassSpace(TOYWORLD_CLASSES, tuple(TOYWORLD_CLASSES[i] for i in unseen), seen,
                         seen_lookup(seen),
                         clip.text_embeddings(TOYWORLD_CLASSES, TEMPLATES["single"]).float())
    model = build_segmentor(cfg.model, clip.embed_dim)
    return model, classes, build_dataset(cfg.data, "test", train=False)


def same_metrics(a: dict, b: dict) -> bool:
    """Equal figures, NaN equal to NaN."""
    flat = lambda m: {**{k: v for k, v in m.items() if k != "per_class"}, **m["per_class"]}
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(
        fa[k] == fb[k] or (math.isnan(fa[k]) and math.isnan(fb[k])) for k in fa)


@pytest.mark.parametrize("inference", [
    InferenceConfig(num_random_queries=2),
    InferenceConfig(mode="slide", crop_size=48, stride=32, short_side=72),
], ids=["whole", "slide"])
def test_one_pass_at_several_values_equals_a_pass_per_value(tiny, inference):
    model, classes, test_set = tiny
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        values = [0.0, 0.05, 0.5]
        together = evaluate_calibrations(model, test_set, classes, inference, values,
                                         torch.device("cpu"), batch_size=2)
        passes_together = len(forwards)
        for value in values:
            alone = evaluate(model, test_set, classes, fixed_at(inference, value),
                             torch.device("cpu"), batch_size=2)
            assert same_metrics(together[value], alone), value
    finally:
        hook.remove()
    # One pass: as many forwards for three values as for one (2 batches, x windows).
    assert passes_together * len(values) == len(forwards) - passes_together
    # The values really change the predictions (or the comparison above proves nothing).
    assert not same_metrics(together[0.0], together[0.5])


def test_predict_calibrated_gives_predict_at_each_value(tiny):
    model, classes, test_set = tiny
    images = torch.stack([test_set[i]["image"] for i in range(2)])
    text = classes.text
    inference = InferenceConfig(mode="slide", crop_size=48, stride=24)
    labels = model.predict_calibrated(images, text, inference, classes.seen_ids, GRID)
    for value, label in zip(GRID, labels):
        assert torch.equal(label, model.predict(images, text, fixed_at(inference, value),
                                                classes.seen_ids))
    with pytest.raises(ValueError, match="must be a number here"):
        model.predict(images, text, InferenceConfig(seen_score_calibration="auto"))


def test_choose_the_best_hiou_ties_to_the_smaller_value_and_nan_means_off():
    assert choose_calibration({0.0: {"hIoU": 10.0}, 0.1: {"hIoU": 30.0},
                               0.2: {"hIoU": 20.0}}) == 0.1
    assert choose_calibration({0.2: {"hIoU": 30.0}, 0.05: {"hIoU": 30.0},
                               0.1: {"hIoU": 30.0}}) == 0.05  # ties: the smaller
    assert choose_calibration({0.0: {"hIoU": math.nan}, 0.1: {"hIoU": 5.0}}) == 0.1
    assert choose_calibration({0.05: {"hIoU": math.nan}, 0.1: {"hIoU": math.nan}}) == 0.0


# ----------------------------------------------------------------------------- config


def test_auto_loads_and_a_number_still_does(tmp_path):
    cfg = config_from_dict({"data": {"select_split": "val", "test_split": "test"},
                            "inference": {"seen_score_calibration": "auto"}})
    assert cfg.inference.seen_score_calibration == "auto"
    assert cfg.inference.calibration_grid == GRID
    assert config_from_dict({"inference": {"seen_score_calibration": 0}}
                            ).inference.seen_score_calibration == 0.0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"select_split": "val", "test_split": "test"}}))
    cfg = load_config(path, ["inference.seen_score_calibration=auto",
                             "inference.calibration_grid=[0, 0.3]"])
    assert (cfg.inference.seen_score_calibration, cfg.inference.calibration_grid) == (
        "auto", [0.0, 0.3])
    assert load_config(path, ["inference.seen_score_calibration=1e-1"]
                       ).inference.seen_score_calibration == 0.1


@pytest.mark.parametrize("inference, key", [
    ({"calibration_grid": []}, "'inference.calibration_grid' must not be empty"),
    ({"calibration_grid": [0.0, 1.0]}, "'inference.calibration_grid[1]' must lie in [0, 1)"),
    ({"calibration_grid": [-0.1]}, "'inference.calibration_grid[0]' must lie in [0, 1)"),
    ({"calibration_grid": [0.1, 0.1]}, "'inference.calibration_grid' repeats a value"),
    ({"calibration_grid": ["a"]}, "'inference.calibration_grid[0]' must be a number"),
    ({"seen_score_calibration": "best"},
     "'inference.seen_score_calibration' must be a number or 'auto', got 'best'"),
])
def test_bad_calibration_settings_are_refused_in_one_line(inference, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"select_split": "val", "test_split": "test"},
                          "inference": inference}, "exp.yaml")
    assert key in str(err.value) and "exp.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_auto_needs_a_selection_split():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"inference": {"seen_score_calibration": "auto"}}, "exp.yaml")
    message = str(err.value)
    assert "'inference.seen_score_calibration'" in message and "'data.select_split'" in message
    assert "\n" not in message


def test_a_stored_config_from_before_the_grid_loads_and_matches(tmp_path):
    stored = to_dict(config_from_dict({"inference": {"seen_score_calibration": 0.05}}))
    del stored["inference"]["calibration_grid"]
    today = config_from_dict({"inference": {"seen_score_calibration": 0.05}})
    assert config_from_dict(stored_config_data(stored, "run")) == today
    # Not reported as a difference: resuming or reusing such a run is not refused for it.
    assert config_differences(stored, today) == {}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(stored))
    assert load_config(path) == today


def test_predict_uses_the_value_stored_with_auto_weights_and_refuses_without(tmp_path):
    from splitmatch.predict import Segmenter

    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "select_split": "val"},
                            "inference": {**TINY["inference"], "seen_score_calibration": "auto"}})
    model = build_segmentor(cfg.model, embed_dim=build_clip(cfg.clip).embed_dim)
    state = {"model": model.state_dict(), "config": to_dict(cfg)}
    torch.save({**state, CALIBRATION: 0.15}, tmp_path / "best_model.pt")
    assert Segmenter(tmp_path / "best_model.pt").cfg.inference.seen_score_calibration == 0.15
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(ConfigError, match="carry no chosen value") as err:
        Segmenter(tmp_path / "state.pt")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- a run


@pytest.mark.integration
def test_a_run_with_auto_chooses_on_val_and_eval_chooses_the_same(tmp_path, ray_cluster,
                                                                 tiny_pseudo_masks):
    from splitmatch.checkpoints import load_state, result_checkpoint
    from splitmatch.checkpoint_evaluation import evaluate_checkpoint
    from splitmatch.tracking import default_tracking_uri

    config = write_config(tmp_path, "auto", tiny_pseudo_masks,
                          **{**SHORT, "num_workers": 2})  # DDP: 2 ranks
    data = yaml.safe_load(config.read_text())
    data["data"]["select_split"] = "val"
    data["inference"]["seen_score_calibration"] = "auto"
    config.write_text(yaml.safe_dump(data))
    out = finish(splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster))
    assert "test split 'test': hIoU" in out
    run_dir = tmp_path / "runs" / "auto"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    chosen = final["seen_score_calibration"]
    assert chosen in GRID, final
    for key in ("hIoU", "sIoU", "uIoU", "mIoU", "select_hIoU", "select_sIoU", "select_uIoU",
                "select_mIoU"):
        assert key in final, key
    client, run = the_run(default_tracking_uri(tmp_path / "runs"))
    metrics = run.data.metrics
    assert metrics["seen_score_calibration"] == chosen
    # The selection split's hIoU at every value of the grid (NaN ones are not logged), the
    # chosen one the best; the final select_* figures apart from the periodic select_hIoU.
    logged = {k: v for k, v in metrics.items() if k.startswith("calibration/")}
    assert set(logged) <= {f"calibration/{v:g}/select_hIoU" for v in GRID}
    if not math.isnan(final["select_hIoU"]):
        assert logged[f"calibration/{chosen:g}/select_hIoU"] == max(logged.values())
        assert metrics["final_select_hIoU"] == pytest.approx(final["select_hIoU"])
    # The result weights carry their value, and `eval` with auto chooses it again.
    result = result_checkpoint(run_dir)
    assert load_state(result)[CALIBRATION] == chosen
    heard = []
    evaluated = evaluate_checkpoint(load_config(config), result, log=heard.append)
    assert evaluated["seen_score_calibration"] == chosen
    assert f"seen-score calibration auto: {chosen:g} chosen on val from [0, 0.05" in heard[0]
    for key in ("hIoU", "sIoU", "uIoU", "mIoU"):
        assert evaluated["select"][key] == pytest.approx(final[f"select_{key}"], rel=1e-9,
                                                         nan_ok=True)
        assert evaluated[key] == pytest.approx(final[key], rel=1e-9, nan_ok=True)
