"""A credential given in a URI is used, shown as ***, and never written at rest: not in a run's
checkpoints, weights, config.yaml, logs or results page, not in MLflow's params, tags or
artifacts (the model included), not in a search's Tune state, not in Ray's session logs."""
import os
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import cli_in_process, finish, search_config, splitmatch, write_config
from splitmatch.config.credentials import CREDENTIAL_VARIABLES
from splitmatch.tracking import MlflowServer

# Made at run time, so that no file holds it before the test: the search for leaks reads Ray's
# session folder, where other tests' job submissions unpack the repository, this file included.
SECRET = f"pw-{secrets.token_hex(8)}"


def files_holding(secret: str, *roots: Path, given: tuple[Path, ...] = ()) -> list[str]:
    """Every file under `roots` whose bytes contain `secret` (pickles and SQLite pages too), but
    the `given` ones (the user's own config files), which must be found: the search is seen to
    work. grep's byte search at C speed (-a: binary files as text, -F: the string as it is,
    LC_ALL=C: bytes), over regular files (-r follows no symlink, -D skip passes over sockets and
    pipes); a Python read of every file cost 1-3 s of a suite's session folder and this test's."""
    assert all(Path(root).is_dir() for root in roots), roots
    done = subprocess.run(["grep", "-rlaFZs", "-D", "skip", "--", secret, *map(str, roots)],
                          capture_output=True, env={**os.environ, "LC_ALL": "C"}, timeout=300)
    # 1: none found; 2: a file it could not read (a daemon removed it meanwhile), as before
    assert done.returncode in (0, 1, 2), done.stderr
    found = {Path(os.fsdecode(name)) for name in done.stdout.split(b"\0") if name}
    missed = [str(path) for path in given if path not in found]
    assert not missed, f"the search does not find the password in {missed}"
    return sorted(str(path) for path in found - set(given))


def ray_session_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())


@pytest.mark.slow
def test_a_tracking_password_is_never_written_at_rest(tmp_path, ray_cluster, monkeypatch,
                                                        capsys):
    # A server that refuses calls without the password: the credentials must reach every MLflow
    # call, the Ray workers' on a cluster that does not share this environment included.
    server = MlflowServer(tmp_path / "server", admin_password=SECRET).start()
    try:
        uri = server.url.replace("http://", f"http://admin:{SECRET}@")
        config = write_config(tmp_path, "secret", max_iters=2, num_workers=1, batch_size=2,
                              checkpoint_every=1, eval_every=2)
        data = yaml.safe_load(config.read_text())
        data["tracking"]["uri"] = uri
        data["data"]["select_split"] = "val"  # so that there is a best_model.pt
        config.write_text(yaml.safe_dump(data))
        out = finish(splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster))
        assert "results page:" in out and "MLflow model:" in out, out[-3000:]
        # A failing command writes its traceback to a log file: that one must be clean too, and
        # so must what it prints. It is refused before Ray, so it runs in this process; loading
        # its config moves the URI's credentials into this process's MLFLOW_TRACKING_* (what
        # the command does), which are taken out again after it (monkeypatch restores them at
        # the end): the search below must get them from its URI, as the run did.
        for name in CREDENTIAL_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        code, printed = cli_in_process(capsys, "train", config, "--set", "train.max_iters=3")
        for name in CREDENTIAL_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        assert code == 2 and "--resume" in printed, printed[-3000:]
        out += printed
        # A search: Tune keeps its own state (experiment state, each trial's params) on disk.
        search = search_config(tmp_path, {"model.num_candidate_queries": {"grid": [2]}})
        data = yaml.safe_load(search.read_text())
        data["tracking"]["uri"] = uri
        search.write_text(yaml.safe_dump(data))
        out += finish(splitmatch("tune", str(search), address=ray_cluster))
        leaks = [line for line in out.splitlines() if SECRET in line]  # shown as ***

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        client = MlflowClient(server.url)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) >= 3  # the run, the search's parent and its trial
        assert all(run.info.status == "FINISHED" for run in runs)
        trained = next(run for run in runs if run.info.run_name == "secret")
        assert client.get_metric_history(trained.info.run_id, "loss")  # the workers logged
        leaks += [run.info.run_name for run in runs
                  if SECRET in repr(run.data.params) + repr(run.data.tags)]
        leaks += files_holding(SECRET, tmp_path, ray_session_dir(), given=(config, search))
        assert leaks == [], "\n".join(leaks)
    finally:
        server.stop()
