"""A copy of the splitmatch package as a wheel lays it out, for what carries the code elsewhere:
a cluster job (`jobs.submit`) and a run's MLflow model (`pyfunc.log_model`).

In a source checkout some subpackages live outside platform/splitmatch/ (pyproject's
package-dir: `splitmatch.dashboards` is the top-level dashboards/, and the packaged configs and
job specs are experiments/ and jobs/), so copying the package's folder alone would leave them
out; from a wheel they are inside it already.
"""
from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterable
from pathlib import Path

import splitmatch

PACKAGE_DIR = Path(splitmatch.__file__).resolve().parent
MAPPED_SUBPACKAGES = ("dashboards", "experiments", "job_specs")


def outside_subpackages() -> dict[str, Path]:
    """{name: folder} of the subpackages whose source lies outside PACKAGE_DIR (none in a wheel)."""
    outside = {}
    for name in MAPPED_SUBPACKAGES:
        spec = importlib.util.find_spec(f"splitmatch.{name}")
        source = Path(list(spec.submodule_search_locations)[0]).resolve()
        if not source.is_relative_to(PACKAGE_DIR):
            outside[name] = source
    return outside


def copy_package(folder: Path, leave_out: Iterable[Path] = ()) -> Path:
    """`folder`/splitmatch, the package with every subpackage in place, less compiled files and
    the files or folders in `leave_out`."""
    skipped = {Path(path).resolve() for path in leave_out}

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [name for name in names
                if name == "__pycache__" or Path(directory, name).resolve() in skipped]

    target = Path(folder) / "splitmatch"
    shutil.copytree(PACKAGE_DIR, target, ignore=ignore)
    for name, source in outside_subpackages().items():
        shutil.copytree(source, target / name, ignore=ignore)
    return target
