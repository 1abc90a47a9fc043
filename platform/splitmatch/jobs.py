"""`splitmatch submit` and `splitmatch jobs`: the same commands as cluster jobs (Ray Job API).

A job runs `jobs/entrypoint.py KIND CONFIG ...` in a runtime environment made of the current
folder (the repository, or a folder `splitmatch init` made: configs, entry point) and the
`splitmatch` package, so the cluster runs exactly the code that submitted it. Each file travels
once: the package as py_modules, the folder without the package's source (`platform/`). Ray 2.60
clusters use token authentication: the client sends the cluster's token (`--token`,
`RAY_AUTH_TOKEN`, or Ray's own token file, ~/.ray/auth_token).
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from splitmatch.errors import UserError
from splitmatch.package_copy import PACKAGE_DIR, copy_package, outside_subpackages

ENTRYPOINT = "jobs/entrypoint.py"
KINDS = ("pseudo", "train", "tune", "eval")
# Never shipped to the cluster: environments, local runs and caches, VCS data, and the package's
# source in a checkout (`/platform`: py_modules ships the package; with both, the toy CLIP's
# weights travelled twice). Ray applies these to the package too, so no name here may match a
# folder inside splitmatch/ (a bare "data" would drop splitmatch/data; "/platform" is anchored at
# the folder Ray packs); local datasets under ./data are kept out by .gitignore, which Ray honours
# for the working directory only.
EXCLUDES = [".venv", "runs", ".git", ".whl", ".gl", "**/__pycache__", "*.egg-info",
            ".pytest_cache", "/platform"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def client(address: str, token: str | None = None):
    """A JobSubmissionClient for the cluster dashboard at `address` (e.g. http://127.0.0.1:8265)."""
    from ray.job_submission import JobSubmissionClient

    from ray.exceptions import AuthenticationError

    given = "--token" if token else "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else None
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    if token is None and os.environ.get("RAY_AUTH_MODE") is None and \
            (Path.home() / ".ray" / "auth_token").exists():
        # Let Ray's own loader send the token it keeps for this user.
        os.environ["RAY_AUTH_MODE"] = "token"
        given = "~/.ray/auth_token"
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        told = f"the token from {given} was refused" if given else "no token was given"
        raise UserError(f"the cluster at {address} needs its auth token and {told}: pass "
                        f"--token TOKEN or set RAY_AUTH_TOKEN (on the head node: "
                        f"ray get-auth-token)") from exc


def entrypoint(kind: str, config: str, overrides: list[str], extra: list[str]) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {KINDS}")
    parts = ["python", ENTRYPOINT, kind, config]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts + list(extra))


def shipped_package() -> Path:
    """The package as a wheel lays it out: PACKAGE_DIR itself from a wheel, else a copy with
    every subpackage in place (`package_copy`). Ray names an upload by its content, so the same
    code uploads once however many copies are made."""
    if not outside_subpackages():
        return PACKAGE_DIR
    return copy_package(Path(tempfile.mkdtemp(prefix="splitmatch-job-")))


def runtime_env(project: Path, pip: list[str] | None = None,
                package: Path = PACKAGE_DIR) -> dict:
    """The job's runtime environment: `project` (the working directory) and the package."""
    env: dict = {"working_dir": str(project), "py_modules": [str(package)],
                 "excludes": EXCLUDES,
                 # `jobs stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default:
                 # 3): time for the command to stop its fit and mark the MLflow run KILLED
                 # (errors.sigterm_as_interrupt, after cluster.init_ray).
                 "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "60"}}
    if pip:
        env["pip"] = pip
    return env


def traveling_config(config: str, project: Path) -> str:
    """The config argument the job gets: a path inside `project`, which travels as the working
    directory, or the name of a packaged config, which travels with the package."""
    from splitmatch.config import config_file

    path = config_file(config).resolve()
    if path.is_relative_to(project):
        return path.relative_to(project).as_posix()
    if path.is_relative_to(PACKAGE_DIR):  # e.g. `toyworld` from an installed wheel
        return path.stem
    raise UserError(f"config {config} lies outside {project}, the folder the job takes to the "
                    f"cluster: copy it there")


def submit(kind: str, config: str, address: str, overrides: list[str] | None = None,
           extra: list[str] | None = None, token: str | None = None,
           submission_id: str | None = None, pip: list[str] | None = None) -> str:
    """Submit `splitmatch KIND CONFIG` as a Ray Job from the current folder; returns the job id."""
    project = Path.cwd().resolve()
    if not (project / ENTRYPOINT).is_file():
        raise UserError(f"splitmatch submit takes the current folder ({project}) to the cluster "
                        f"and runs its {ENTRYPOINT}, which it lacks: run it from the repository "
                        f"or from a folder made by `splitmatch init`")
    argument = traveling_config(config, project)
    jobs = client(address, token)
    package = shipped_package()
    try:
        return jobs.submit_job(
            entrypoint=entrypoint(kind, argument, overrides or [], extra or []),
            runtime_env=runtime_env(project, pip, package), submission_id=submission_id,
            metadata={"splitmatch.kind": kind, "config": argument})
    finally:
        if package != PACKAGE_DIR:  # uploaded by now
            shutil.rmtree(package.parent, ignore_errors=True)


def follow(address: str, job_id: str, token: str | None = None, out=print) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    jobs = client(address, token)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out(lines, end="")

    asyncio.run(tail())
    status = str(jobs.get_job_status(job_id).value)
    while status not in TERMINAL:  # logs can end a moment before the status is final
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id).value)
    return status
