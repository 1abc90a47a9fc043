"""`splitmatch demo`: its budget and config (its end-to-end run, from the installed wheel, is in
test_wheel.py)."""
from splitmatch.config import flatten, load_config
from splitmatch.demo import DEMO_CONFIG, demo_config


def test_the_demo_runs_the_toy_config_on_its_own_budget_which_set_overrides():
    toy = load_config(DEMO_CONFIG)
    demo = demo_config()
    assert (demo.train.max_iters, demo.optim.lr, demo.model.backbone) == (500, 6.0e-4, "resnet10")
    assert (toy.train.max_iters, toy.optim.lr, toy.model.backbone) == (1000, 3.0e-4, "resnet18")
    # Nothing but the budget and the run name differ from the toy config: the toy CLIP is the
    # toy config's own, the one that comes with the package.
    toy_values = flatten(toy)
    differ = {key for key, value in flatten(demo).items() if toy_values[key] != value}
    assert differ == {"name", "model.backbone", "train.max_iters", "optim.lr"}
    # Calibration is the toy config's protocol: chosen on val, as for every run of it.
    assert demo.inference.seen_score_calibration == "auto" and demo.data.select_split == "val"
    assert demo.train.checkpoint_every == demo.train.eval_every == 500  # one checkpoint, at the end
    # --quick uses the same toy CLIP.
    assert demo_config(quick=True).toy_clip == demo.toy_clip
    assert demo_config(quick=True).train.max_iters == 30
    assert demo_config(overrides=["train.max_iters=50"]).train.max_iters == 50


# The demo's end-to-end run (`splitmatch demo --quick` as a new user runs it) is test_wheel's: the
# suite runs the demo once, from the installed wheel.
