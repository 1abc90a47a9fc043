"""The configs and job files that ship inside splitmatch: found by name from any folder, copied out
by `splitmatch init`, and a submitted job packs each file once."""
import collections
import shutil
import zipfile
from pathlib import Path

import pytest

from splitmatch import jobs
from splitmatch.cli import main
from splitmatch.config import ConfigError, load_config
from splitmatch.errors import UserError
from helpers import PROJECT_ROOT

EXPERIMENTS = PROJECT_ROOT / "experiments"


def test_a_packaged_config_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no experiments/ here
    expected = load_config(EXPERIMENTS / "toyworld.yaml")
    for argument in ("toyworld", "toyworld.yaml", "experiments/toyworld.yaml"):
        assert load_config(argument) == expected, argument
    # A file of the name wins over the packaged config.
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "toyworld.yaml").write_text("name: mine\n")
    assert load_config("experiments/toyworld.yaml").name == "mine"


def test_an_unknown_config_is_one_line_that_lists_the_packaged_names(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    for argument in ("toyworl", "elsewhere/toyworld.yaml"):
        with pytest.raises(ConfigError, match="no such file, nor a packaged config"):
            load_config(argument)
    assert main(["config", "toyworl"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    names = ", ".join(sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
    assert line.startswith(f"config error: cannot read config file toyworl: no such file, nor a "
                           f"packaged config of that name (packaged: {names}) [traceback: ")


def test_init_copies_the_examples_out_and_overwrites_nothing(tmp_path, capsys):
    project = tmp_path / "project"
    assert main(["init", str(project)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"8 example configs in {project / 'experiments'}, the cluster job files "
                          f"cluster.yaml, entrypoint.py, rayjob.yaml in {project / 'jobs'}\n")
    copied = sorted(p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file())
    expected = sorted([f"experiments/{p.name}" for p in EXPERIMENTS.glob("*.yaml")]
                      + ["jobs/cluster.yaml", "jobs/entrypoint.py", "jobs/rayjob.yaml"])
    assert copied == expected
    for name in copied:
        assert (project / name).read_bytes() == (PROJECT_ROOT / name).read_bytes(), name
    # Edited copies survive a second init, which refuses in one line.
    edited = project / "experiments" / "toyworld.yaml"
    edited.write_text("name: edited\n")
    assert main(["init", str(project)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {project / 'experiments'}/") and "(and 10 more)" in line
    assert "`splitmatch init` overwrites nothing" in line
    assert edited.read_text() == "name: edited\n"


def _packed(runtime_env: dict, scratch: Path) -> tuple[collections.Counter, int]:
    """What the Job SDK uploads for `runtime_env`, packed by Ray's own code: how often each file
    is packed, and the bytes of the zip files."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    parts = [(runtime_env["working_dir"], False,
              ray_constants.get_runtime_env_default_excludes() + runtime_env["excludes"])]
    parts += [(module, True, runtime_env["excludes"]) for module in runtime_env["py_modules"]]
    packed, size = collections.Counter(), 0
    for index, (folder, as_module, excludes) in enumerate(parts):
        target = scratch / f"packed-{index}.zip"
        create_package(folder, target, include_gitignore=True, include_parent_dir=as_module,
                       excludes=excludes)
        base = Path(folder).parent if as_module else Path(folder)
        with zipfile.ZipFile(target) as packed_zip:
            packed.update((base / name).resolve() for name in packed_zip.namelist()
                          if not name.endswith("/"))
        size += target.stat().st_size
    return packed, size


def test_a_job_from_the_repository_packs_each_file_once(tmp_path):
    """The package travels as py_modules, laid out as in the wheel, and the working directory
    without its source: the toy CLIP's weights once, not twice."""
    package = jobs.shipped_package()
    try:
        packed, size = _packed(jobs.runtime_env(PROJECT_ROOT, package=package), tmp_path)
    finally:
        shutil.rmtree(package.parent)
    assert package != jobs.PACKAGE_DIR  # a checkout: dashboards/ etc. lie outside platform/
    assert max(packed.values()) == 1, [path for path, count in packed.items() if count > 1]
    weights = list((jobs.PACKAGE_DIR / "toyclip" / "shipped").glob("*/*.pt"))
    shipped = [path for path in packed if path.name in {w.name for w in weights}]
    assert weights and len(shipped) == len(weights), shipped
    assert (EXPERIMENTS / "toyworld.yaml").resolve() in packed  # the configs travel too
    # What publishing a run's results and a packaged config name need on a cluster without
    # the editable install (`splitmatch.dashboards` is the checkout's top-level dashboards/).
    for name in ("dashboards/run_page.py", "experiments/toyworld.yaml", "job_specs/entrypoint.py"):
        assert package / name in packed, name
    assert size < sum(path.stat().st_size for path in weights) + 5e6, size


def test_a_job_takes_a_config_that_travels_with_it(tmp_path, monkeypatch):
    assert jobs.traveling_config("toyworld", PROJECT_ROOT) == "experiments/toyworld.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    with pytest.raises(UserError, match=f"config {outside} lies outside {PROJECT_ROOT}, the "
                                        f"folder the job takes to the cluster"):
        jobs.traveling_config(str(outside), PROJECT_ROOT)
    monkeypatch.chdir(tmp_path)  # no jobs/entrypoint.py: refused before any cluster is called
    with pytest.raises(UserError, match="run it from the repository or from a folder made by "
                                        "`splitmatch init`"):
        jobs.submit("train", "toyworld", "http://127.0.0.1:1")
