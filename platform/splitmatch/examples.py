"""The example configs and cluster job files that ship inside splitmatch, and `splitmatch init`.

In the repository they live in experiments/ and jobs/ and nowhere else: pyproject.toml installs
those folders as the subpackages `splitmatch.experiments` and `splitmatch.job_specs`, so an
editable install and a wheel find them the same way (and so does a cluster job submitted from a
wheel, whose package travels whole; from a checkout the configs travel in the working directory).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from splitmatch.errors import UserError

CONFIGS = "splitmatch.experiments"
JOB_SPECS = "splitmatch.job_specs"


def _folder(package: str) -> Path:
    try:
        folder = files(package)
    except ModuleNotFoundError as exc:  # an editable install's finder lists its packages
        raise UserError(f"the package {package} is not installed: an editable install made "
                        f"before the examples shipped needs `pip install -e .` again") from exc
    # Always a real folder: wheels, editable installs and Ray's py_modules are unpacked.
    return Path(str(folder))


def configs_folder() -> Path:
    return _folder(CONFIGS)


def config_names() -> list[str]:
    return sorted(path.stem for path in configs_folder().glob("*.yaml"))


def packaged_config(argument: str | Path) -> Path | None:
    """The packaged config a config argument names, if any: `toyworld`, `toyworld.yaml` or
    `experiments/toyworld.yaml` (the README's spelling, which then works from any folder)."""
    argument = Path(argument)
    if argument.parent not in (Path("."), Path("experiments")) or argument.suffix not in ("", ".yaml"):
        return None
    path = configs_folder() / f"{argument.stem}.yaml"
    return path if path.is_file() else None


def example_files() -> list[tuple[Path, Path]]:
    """(packaged file, its place in a project folder) for every config and cluster job file."""
    jobs = sorted(path for path in _folder(JOB_SPECS).iterdir()
                  if path.suffix in (".yaml", ".py") and path.name != "__init__.py")
    return ([(path, Path("experiments") / path.name)
             for path in sorted(configs_folder().glob("*.yaml"))]
            + [(path, Path("jobs") / path.name) for path in jobs])


def copy_examples(folder: str | Path) -> list[Path]:
    """`splitmatch init`: copy the example configs and job files into `folder` (experiments/,
    jobs/, as in the repository); returns the files written. Refuses to overwrite any file."""
    folder = Path(folder)
    plan = [(source, folder / place) for source, place in example_files()]
    taken = [target for _, target in plan if target.exists()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise FileExistsError(f"{taken[0]} exists{more}: `splitmatch init` overwrites nothing; "
                              f"move it away or choose another folder")
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return [target for _, target in plan]
