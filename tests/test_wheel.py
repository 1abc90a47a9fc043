"""A wheel runs the main job: built, installed into a fresh environment with no source tree on its
path, `splitmatch demo --quick` from an empty folder, as a new user runs it (the suite's one run of
the demo: what it prints, writes and records is checked here)."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import PROJECT_ROOT
from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig
from splitmatch.toyclip import zero_shot_report

# What the build reads; a copy, because a build in the repository leaves build/ and egg-info there.
SOURCES = ("pyproject.toml", "README.md", "platform", "dashboards", "experiments", "jobs")


def _run(*command, **kw):
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kw)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_the_wheel_runs_the_demo_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (PROJECT_ROOT / name).is_dir():
            shutil.copytree(PROJECT_ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(PROJECT_ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", tmp_path / "dist", timeout=300)
    (wheel,) = (tmp_path / "dist").glob("splitmatch-*.whl")
    print(f"wheel {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
    with zipfile.ZipFile(wheel) as built:
        names = built.namelist()
    assert {"splitmatch/experiments/toyworld.yaml", "splitmatch/job_specs/entrypoint.py",
            "splitmatch/job_specs/rayjob.yaml", "splitmatch/dashboards/run_page.py"} <= set(names)
    assert all(n.startswith(("splitmatch/", "splitmatch-")) for n in names)  # no platform/

    # The wheel alone in a fresh environment; the dependencies come from this one's site-packages,
    # named in a .pth file: a folder named there is only put on the path (its .pth files, this
    # environment's editable install of splitmatch among them, are not read).
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, timeout=300)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel,
         timeout=300)
    site = _run(venv / "bin" / "python", "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1",
               RAY_ADDRESS="local")  # a Ray instance of its own, whose workers run this venv
    where = _run(venv / "bin" / "python", "-c", "import splitmatch; print(splitmatch.__file__)",
                 env=env, cwd=tmp_path)
    assert where.startswith(str(venv)), where

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(venv / "bin" / "splitmatch", "config", "toyworld", env=env, cwd=empty,
                timeout=120).startswith("name: toyworld\n")
    out = _run(venv / "bin" / "splitmatch", "demo", "--quick", env=env, cwd=empty, timeout=1200)
    scores = re.search(r"\nhIoU (\S+)\s+sIoU (\S+)\s+uIoU (\S+)\s+\(mIoU \S+\) after 30 iterations",
                       out)
    assert scores, out[-3000:]
    print(*(line for line in out.splitlines() if line.startswith(("hIoU", "time per"))), sep="\n")
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # all it wrote is under runs/
    assert "toy-world pseudo-mask quality" in out and "splitmatch ui --storage-path" in out
    timing = re.search(r"\ntime per phase: toy CLIP (\d+) s, pseudo masks (\d+) s, training and "
                       r"test (\d+) s, results page and model (\d+) s; total (\d+) s\n", out)
    assert timing, out[-3000:]
    assert sum(map(int, timing.groups()[:4])) <= int(timing.group(5)) + 4
    assert "results page: " in out and "MLflow model: models:/" in out
    assert "TrainingReport(" not in out and "core_worker.cc" not in out  # Ray's lines hidden
    run_dir = re.search(r"run directory: (\S+)", out).group(1)
    pictures = list((empty / "runs").glob("*/viz/*.png"))
    assert len(pictures) == 2 and str(pictures[0]).startswith(run_dir)
    client = MlflowClient(f"sqlite:///{empty / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("toyworld").experiment_id])
    assert run.info.status == "FINISHED"
    assert abs(run.data.metrics["uIoU"] - float(scores.group(3))) < 0.01

    # The toy CLIP's weights came in the wheel (no pretraining on the spot), loaded the way any
    # user loads a checkpoint: >= 90% zero-shot accuracy over all ten classes, and on each unseen
    # class, on held-out images it never trained on.
    assert "comes with splitmatch" in out and "pretraining" not in out
    checkpoint = re.search(r"toy CLIP: using cached checkpoint (\S+\.pt)", out).group(1)
    assert checkpoint.startswith(str(empty / "runs"))
    clip = build_clip(ClipConfig(model_name="splitmatch-toy-vit", pretrained=checkpoint))
    report = zero_shot_report(clip, num_images=500)
    assert report["accuracy"] >= 0.90, report
    assert min(report["per_class"][c] for c in ("leaf", "starfish", "donut")) >= 0.90, report
