"""The command line itself: what `--help` and `config` cost a user."""
import subprocess
import sys
import time

import pytest

from helpers import PROJECT_ROOT, ctrl_c_reaches_it

PROBE = """
import sys
from splitmatch import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = sorted(m for m in ("torch", "torchvision", "ray", "mlflow", "open_clip", "numpy")
               if m in sys.modules)
print("HEAVY", ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def probe(*args):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          timeout=60, cwd=PROJECT_ROOT)
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("HEAVY")]
    return done, [name for name in line[len("HEAVY "):].split(",") if name]


@pytest.mark.integration
def test_help_and_config_load_neither_torch_nor_ray():
    done, heavy = probe("--help")
    assert done.returncode == 0 and "submit" in done.stdout and heavy == [], heavy
    done, heavy = probe("train", "--help")
    assert done.returncode == 0 and "--resume" in done.stdout and heavy == [], heavy
    done, heavy = probe("config", "experiments/voc_preset.yaml",
                        "--set", "model.num_candidate_queries=7")
    assert done.returncode == 0 and "num_candidate_queries: 7" in done.stdout and heavy == [], heavy


@pytest.mark.integration
def test_help_answers_within_a_second():
    best = min(_timed([sys.executable, "-m", "splitmatch.cli", "--help"]) for _ in range(3))
    print(f"splitmatch --help: {best:.2f} s")
    assert best < 1.0, f"splitmatch --help took {best:.2f} s"


def _timed(command) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=60, cwd=PROJECT_ROOT)
    return time.perf_counter() - start


def test_every_dependency_has_a_tested_range_and_the_lock_pins_inside_it():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    required = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                          for r in extra]
    for text in required:
        requirement = Requirement(text)
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {"=="} or {">=", "<"} <= operators, f"{text}: no tested range"
        pinned = pins[requirement.name.lower().replace("_", "-")]
        assert requirement.specifier.contains(pinned), f"{text}: constraints.txt has {pinned}"
    # What CI runs is what the README tells a user to run.
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "pip install -q -c constraints.txt -e '.[dev]' && .venv/bin/python -m pytest -q" in ci
    assert readme.count("pip install -c constraints.txt -e '.[dev]'") == 2


@pytest.mark.integration
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ui_serves_the_run_store_on_loopback_until_interrupted(tmp_path, stop):
    import os
    import signal
    import socket
    import urllib.request

    from mlflow.tracking import MlflowClient

    from splitmatch.network import free_port

    store = tmp_path / "runs"
    store.mkdir()
    MlflowClient(f"sqlite:///{store / 'mlflow.db'}").create_experiment("shown")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "ui", "--storage-path", str(store),
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=ctrl_c_reaches_it)
    try:
        line = ui.stdout.readline()
        assert line.startswith(f"MLflow UI for {store}: http://127.0.0.1:{port}"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/"
                                    f"get-by-name?experiment_name=shown", timeout=10) as response:
            assert response.status == 200 and b'"name": "shown"' in response.read().replace(b'":"', b'": "')
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and b"MLflow" in response.read()
    finally:
        ui.send_signal(getattr(signal, stop))
        code = ui.wait(timeout=60)
    assert (code, stop) in {(130, "SIGINT"), (143, "SIGTERM")}, ui.stderr.read()
    assert ("terminated" if stop == "SIGTERM" else "interrupted") in ui.stderr.read()
    with pytest.raises(ConnectionRefusedError):  # the MLflow server went with it
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    missing = subprocess.run([sys.executable, "-m", "splitmatch.cli", "ui", "--storage-path",
                              str(tmp_path / "none")], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ))
    assert missing.returncode == 2 and "no MLflow store at" in missing.stderr
