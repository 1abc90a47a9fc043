"""What many test files share: the tiny model and toy world every Ray test trains, the config
writers built on it, and the runners of `splitmatch` subprocesses."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from splitmatch.config import config_from_dict, dump_config
from splitmatch.toyclip import ToyClipRecipe

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository the tests run in

TINY = {
    "model": {"backbone": "resnet18", "pixel_decoder": "fpn", "hidden_dim": 32, "mask_dim": 32,
              "num_heads": 2, "dim_feedforward": 64, "enc_layers": 0, "dec_layers": 2,
              "num_seen_queries": 6, "num_candidate_queries": 4, "mfe": {"num_groups": 8}},
    "data": {"crop_size": 64, "test_split": "test",
             "toyworld": {"num_train": 16, "num_val": 4, "num_test": 4, "image_size": 64}},
    "clip": {"model_name": "splitmatch-tiny-vit", "pretrained": None},
    "pseudo_masks": {"image_size": 64, "scales": [4, 6], "min_area": 8, "batch_size": 8,
                     "gpus_per_actor": 0.0},
    "loss": {"num_points": 256},
    "inference": {"num_random_queries": 2},
}

# A few toy-CLIP steps of small batches: enough to exercise every code path, not to learn anything.
RECIPE = ToyClipRecipe(eval_images=20, log_every=2)


def tiny_config(tmp_path: Path, name: str, experiment: str = "tests", cache_dir: Path | None = None,
                **train) -> dict:
    """TINY as a run `name` of its own, with its store under `tmp_path` and its pseudo-mask cache
    there too unless `cache_dir` names one (the session's `tiny_pseudo_masks`); `train` keys
    replace the defaults of a short 2-worker run."""
    data = yaml.safe_load(yaml.safe_dump(TINY))
    data["name"] = name
    data["pseudo_masks"]["cache_dir"] = str(cache_dir or tmp_path / "cache")
    data["tracking"] = {"experiment": experiment}
    data["train"] = {"max_iters": 6, "batch_size": 4, "num_workers": 2, "checkpoint_every": 3,
                     "eval_every": 3, "log_every": 1, "loader_workers": 0, "num_visualizations": 1,
                     "storage_path": str(tmp_path / "runs"), **train}
    return data


SHORT = {"max_iters": 2, "batch_size": 2, "num_workers": 1, "checkpoint_every": 2,
         "eval_every": 2, "num_visualizations": 0}  # one worker, two iterations


def write_config(tmp_path: Path, name: str, cache_dir: Path | None = None, **train) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_config(config_from_dict(tiny_config(tmp_path, name, cache_dir=cache_dir,
                                                             **train))))
    return path


def search_config(tmp_path: Path, space: dict, cache_dir: Path | None = None, **tune) -> Path:
    data = tiny_config(tmp_path, "search", "search", cache_dir, **SHORT, max_failures=0)
    data["seed"] = 0
    data["data"]["select_split"] = "val"  # searches choose on it; "test" is reported
    data["tune"] = {"search": "grid", "max_concurrent_trials": 1, "space": space, **tune}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def job_config(tmp_path: Path, name: str, train: dict | None = None,
               cache_dir: Path | None = None, **clip) -> Path:
    """A tiny toy-world config inside the project (configs travel with the working directory);
    `train` keys replace SHORT's."""
    data = tiny_config(tmp_path, name, "jobs", cache_dir, **{**SHORT, **(train or {})})
    data["clip"].update(clip)
    path = PROJECT_ROOT / "experiments" / f"_test_{tmp_path.name}_{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def toy_config(tmp_path: Path, **sections):
    """A pseudo-mask-only config: 12 toy training images, the tiny CLIP."""
    data = {
        "data": {"toyworld": {"num_train": 12, "num_val": 4, "image_size": 64}},
        "clip": {"model_name": "splitmatch-tiny-vit", "pretrained": None},
        "pseudo_masks": {"image_size": 64, "scales": [4, 6], "min_area": 8, "batch_size": 4,
                         "cache_dir": str(tmp_path / "cache"), "gpus_per_actor": 0.0},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def ctrl_c_reaches_it() -> None:
    """Popen's preexec_fn: SIGINT acts in the child as from a terminal even when pytest runs as a
    background job, which starts with SIGINT ignored and passes that on to its children."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def splitmatch(*args, address, env_extra=None, **kw):
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "splitmatch.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ctrl_c_reaches_it, **kw)


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def cli(*args):
    return subprocess.run([sys.executable, "-m", "splitmatch.cli", *args], capture_output=True,
                          text=True, timeout=400)


def cli_in_process(capsys, *args) -> tuple[int, str]:
    """`splitmatch ARGS` in this process: (exit code, what it printed, stdout then stderr). For
    refusals and evaluations, where the command's output is checked but not its being a process
    of its own: it saves an interpreter's start and its imports of torch, Ray and MLflow."""
    from splitmatch import cli as splitmatch_cli

    capsys.readouterr()  # only this command's output
    code = splitmatch_cli.main([str(arg) for arg in args])
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def the_run(uri, experiment="tests"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def steps(client, run, key):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def children(client, experiment="search"):
    """(parent runs, child runs) of the searches in `experiment`."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], []
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("splitmatch.kind") == "search"]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, kids
