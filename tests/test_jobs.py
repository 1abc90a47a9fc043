"""`splitmatch submit` / `splitmatch jobs` against the session's real head node (token auth on)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from splitmatch import jobs
from splitmatch.tracking import default_tracking_uri
from splitmatch.checkpoints import newest_checkpoint
from helpers import PROJECT_ROOT, cli, job_config


@pytest.mark.slow
def test_submit_follow_logs_and_mlflow_run(tmp_path, ray_head, tiny_pseudo_masks):
    _, address = ray_head
    config = job_config(tmp_path, "jobok", cache_dir=tiny_pseudo_masks)
    try:
        submitted = cli("submit", "train", str(config.relative_to(PROJECT_ROOT)), "--address",
                        address, "--follow", "--", "--build-pseudo-masks")
    finally:
        config.unlink()
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = submitted.stdout.splitlines()[0].strip()
    assert f"job {job_id}: SUCCEEDED" in submitted.stdout
    status = cli("jobs", "status", job_id, "--address", address)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = cli("jobs", "logs", job_id, "--address", address)
    assert "hIoU" in logs.stdout and "last checkpoint" in logs.stdout
    assert "results page:" in logs.stdout and "MLflow model:" in logs.stdout
    listed = cli("jobs", "list", "--address", address)
    assert job_id in listed.stdout and "jobs/entrypoint.py train" in listed.stdout
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "hIoU" in runs[0].data.metrics


@pytest.mark.slow
def test_a_stopped_job_marks_its_run_killed_and_keeps_its_checkpoint(tmp_path, ray_head,
                                                                      tiny_pseudo_masks):
    """`jobs stop` sends SIGTERM: the command stops its fit as on Ctrl-C, so the MLflow run ends
    KILLED (not RUNNING for ever) and the run can go on with --resume."""
    _, address = ray_head
    config = job_config(tmp_path, "jobstop", train={"max_iters": 400, "checkpoint_every": 2,
                                                    "eval_every": 400, "log_every": 1},
                        cache_dir=tiny_pseudo_masks)
    try:
        submitted = cli("submit", "train", str(config.relative_to(PROJECT_ROOT)), "--address",
                        address, "--", "--build-pseudo-masks")
    finally:
        config.unlink()
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "jobstop"
    deadline = time.time() + 300
    # Watched through the Job API from here: a `splitmatch jobs status` process every 0.5 s
    # would take a core of two from the job it waits for (the command is tested above).
    job_api = jobs.client(address)
    while not (newest_checkpoint(run_dir) or (None, 0))[1] >= 4:
        status = job_api.get_job_status(job_id).value
        assert status in ("PENDING", "RUNNING") and time.time() < deadline, (
            status, cli("jobs", "logs", job_id, "--address", address).stdout[-3000:])
        time.sleep(0.5)
    assert cli("jobs", "stop", job_id, "--address", address).stdout.strip() == "stopped"
    followed = cli("jobs", "logs", job_id, "--address", address, "--follow")
    assert f"job {job_id}: STOPPED" in followed.stdout, followed.stdout[-3000:]
    logs = cli("jobs", "logs", job_id, "--address", address).stdout
    assert "interrupted: the MLflow run of jobstop is marked KILLED" in logs, logs[-3000:]
    assert "--resume" in logs
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert run.info.status == "KILLED"
    newest = newest_checkpoint(run_dir)
    assert newest is not None and 4 <= newest[1] < 400


def test_broken_config_fails_with_the_error_in_the_logs(tmp_path, ray_head):
    _, address = ray_head
    # Valid YAML and types, but its CLIP config folder does not exist on the cluster.
    config = job_config(tmp_path, "jobbad", model_config_dir=str(tmp_path / "no_such_folder"))
    try:
        submitted = cli("submit", "pseudo", str(config.relative_to(PROJECT_ROOT)), "--address",
                        address)
    finally:
        config.unlink()
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[-1]
    followed = cli("jobs", "logs", job_id, "--address", address, "--follow")
    assert followed.returncode == 1 and f"job {job_id}: FAILED" in followed.stdout
    logs = cli("jobs", "logs", job_id, "--address", address).stdout
    assert "clip.model_config_dir" in logs and "no_such_folder" in logs


def test_locally_invalid_config_is_not_submitted(ray_head):
    _, address = ray_head
    refused = cli("submit", "train", "experiments/toyworld.yaml", "--address", address, "--set",
                  "model.num_seen_queries=-1")
    assert refused.returncode == 2 and "model.num_seen_queries" in refused.stderr


def test_wrong_token_is_rejected(ray_head):
    _, address = ray_head
    denied = cli("jobs", "list", "--address", address, "--token", "not-the-token")
    assert denied.returncode == 2 and "Traceback" not in denied.stderr
    (line,) = denied.stderr.strip().splitlines()
    assert line.startswith(f"error: the cluster at {address} needs its auth token and the token "
                           f"from --token was refused: pass --token TOKEN or set RAY_AUTH_TOKEN")
    assert "[traceback: " in line


def _set_flags(text: str) -> dict[str, str]:
    return dict(re.findall(r"--set ([\w.]+)=(\S+)", text))


# The locations a multi-node run shares (tests/test_multinode.py runs with these on S3).
SHARED = ("train.storage_path", "pseudo_masks.cache_dir", "toy_clip.cache_dir", "tracking.uri")


def test_cluster_specs_agree_with_each_other_the_readme_and_the_tests():
    """jobs/cluster.yaml (Ray cluster launcher) and jobs/rayjob.yaml (KubeRay): valid as far as
    offline tools can tell, token auth on every node, one image, the CLI as entry point, and the
    same job on the same shared storage as the README's three steps."""
    import jsonschema
    import ray
    from ray.runtime_env import RuntimeEnv

    from splitmatch.config import load_config

    text = (PROJECT_ROOT / "jobs" / "cluster.yaml").read_text()
    launcher = yaml.safe_load(text)
    schema = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema.read_text()))  # Ray's own launcher schema
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])
    assert any(t["resources"].get("GPU") for t in launcher["available_node_types"].values())
    assert all(t["node_config"].get("IamInstanceProfile")  # each node reaches the bucket
               for t in launcher["available_node_types"].values())
    image = launcher["docker"]["image"]
    assert ray.__version__ in image

    rayjob = yaml.safe_load((PROJECT_ROOT / "jobs" / "rayjob.yaml").read_text())
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == image
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "splitmatch-ray-token"
        assert {"secretRef": {"name": "splitmatch-s3"}} in container["envFrom"]
        mounts = {m["name"] for m in container["volumeMounts"]}
        assert mounts <= {v["name"] for v in pod["volumes"]}
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"]
    runtime_env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # Ray validates it
    assert runtime_env["env_vars"]["PYTHONPATH"] == "platform"

    # One job, one entry point, the same shared locations: the RayJob, the launcher's notes and
    # the README's third step.
    assert spec["entrypoint"].startswith("python jobs/entrypoint.py train ")
    readme = (PROJECT_ROOT / "README.md").read_text()
    step = readme[readme.index("## From one machine to a cluster"):]
    step = step[:step.index("\n## ", 5)]
    flags = [_set_flags(spec["entrypoint"]), _set_flags(text), _set_flags(step.replace("\\\n", " "))]
    assert all(f.keys() == flags[0].keys() for f in flags) and set(SHARED) <= flags[0].keys()
    for f in flags:
        assert all(f[key].startswith("s3://YOUR-BUCKET/splitmatch/") for key in SHARED[:3])
        assert f["tracking.uri"].startswith("http://")
        cfg = load_config(PROJECT_ROOT / "experiments" / "voc_preset.yaml",
                          [f"{k}={v}" for k, v in f.items()])
        assert cfg.train.storage_path.startswith("s3://")
    assert "--build-pseudo-masks" in spec["entrypoint"] and "--build-pseudo-masks" in step
    # The entry point is the CLI itself.
    helped = subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "entrypoint.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "submit" in helped.stdout


def test_excludes_spare_the_package():
    """Ray applies the job excludes to the shipped package too: none may name a part of it."""
    from splitmatch.jobs import EXCLUDES, PACKAGE_DIR
    parts = {p.name for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts}
    assert "data" in parts and not parts & set(EXCLUDES)
