"""The command line itself: what `--help` and `config` cost a user."""
import subprocess
import sys
import time

from splitmatch.jobs import PROJECT_ROOT

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


def test_help_and_config_load_neither_torch_nor_ray():
    done, heavy = probe("--help")
    assert done.returncode == 0 and "submit" in done.stdout and heavy == [], heavy
    done, heavy = probe("train", "--help")
    assert done.returncode == 0 and "--resume" in done.stdout and heavy == [], heavy
    done, heavy = probe("config", "experiments/voc_split_matching.yaml",
                        "--set", "model.num_candidate_queries=7")
    assert done.returncode == 0 and "num_candidate_queries: 7" in done.stdout and heavy == [], heavy


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
    assert "pip install -q -c constraints.txt -e '.[dev]'" in ci
    assert readme.count("pip install -c constraints.txt -e '.[dev]'") == 2
