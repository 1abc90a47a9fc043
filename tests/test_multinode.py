"""The platform on a real multi-node Ray cluster (two node processes on this machine, shared
storage = the local disk both see): work placed on both nodes, a node killed mid-run, resource
errors named before any work. The tests that leave a cluster as they found it share one
(`TestOneCluster`, with the node-killing test last); the one that kills and re-adds a node and
asserts on every actor the cluster had, and the one whose nodes have an environment of their
own (S3), start theirs."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from splitmatch.config import dump_config
from splitmatch.pseudo.cache import PseudoMaskCache, cache_dir
from helpers import splitmatch, toy_config, write_config


def shard_nodes(shard_dir) -> set[str]:
    nodes = set()
    for path in shard_dir.glob("shard-*.npz"):
        try:
            with np.load(path) as shard:
                nodes.add(str(shard["node"]))
        except Exception:  # noqa: BLE001 - being written right now
            pass
    return nodes


def output(proc, timeout) -> str:
    """What `proc` printed once it exits; killed if it outlives `timeout`, so that it does not
    hold the CPUs of a cluster that later tests share."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


@pytest.mark.slow
class TestOneCluster:
    """Tests that share one two-node cluster (`shared_two_nodes`), in this order: each leaves it
    as it found it, both nodes up and idle, except the last, which kills its worker node."""

    def test_work_that_fits_on_no_node_is_refused_before_it_starts(self, tmp_path,
                                                                   shared_two_nodes):
        # Two CPUs in the cluster, one per node: a 2-CPU worker or actor fits nowhere.
        config = write_config(tmp_path, "wide", num_workers=1, cpus_per_worker=2)
        proc = splitmatch("train", str(config), "--build-pseudo-masks",
                          address=shared_two_nodes.address)
        out = output(proc, timeout=120)
        assert proc.returncode == 2, out[-3000:]
        assert ("train.num_workers / train.cpus_per_worker / train.use_gpu: one Ray Train worker "
                "needs 2 CPU, more than any of the 2 node(s) of the Ray cluster has") in out
        assert not (tmp_path / "runs" / "wide").exists() and not (tmp_path / "cache").exists()
        cfg = toy_config(tmp_path, pseudo_masks={"cpus_per_actor": 2.0})
        pseudo = tmp_path / "pseudo.yaml"
        pseudo.write_text(dump_config(cfg))
        proc = splitmatch("pseudo", str(pseudo), address=shared_two_nodes.address)
        out = output(proc, timeout=120)
        assert proc.returncode == 2 and "pseudo_masks.num_actors / cpus_per_actor / " \
            "gpus_per_actor: one pseudo-mask actor needs 2 CPU, more than any" in out, out[-3000:]

    def test_search_places_trials_on_both_nodes_with_one_shared_cache(self, tmp_path,
                                                                      shared_two_nodes):
        import yaml
        from mlflow.tracking import MlflowClient

        from helpers import children, search_config

        config = search_config(tmp_path, {"model.num_candidate_queries": {"grid": [2, 3]}},
                               max_concurrent_trials=2)
        proc = splitmatch("tune", str(config), address=shared_two_nodes.address)
        out = output(proc, timeout=600)
        assert proc.returncode == 0 and "2 trials, 0 failed" in out, out[-4000:]
        client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        (parent,), kids = children(client)
        assert parent.info.status == "FINISHED" and len(kids) == 2
        assert all(k.info.status == "FINISHED" and "hIoU" in k.data.metrics for k in kids)
        # One worker of 1 CPU per trial on 1-CPU nodes: the two trials ran on the two nodes ...
        assert {k.data.tags["ray_node"] for k in kids} == set(shared_two_nodes.node_ids())
        # ... from one pseudo-mask cache, built once (the other trial waited for its lock).
        (key,) = {k.data.tags["pseudo_cache_key"] for k in kids}
        caches = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
        assert [p.name for p in caches] == [key]
        assert json.loads((caches[0] / "manifest.json").read_text())["complete"]
        assert yaml.safe_load(config.read_text())["tune"]["max_concurrent_trials"] == 2

    def test_a_submitted_job_runs_on_the_multi_node_cluster(self, tmp_path, shared_two_nodes):
        from mlflow.tracking import MlflowClient

        from splitmatch.tracking import default_tracking_uri
        from helpers import PROJECT_ROOT, cli, job_config

        # Two Train workers of 1 CPU: the job's training needs both nodes.
        config = job_config(tmp_path, "jobmulti")
        data = __import__("yaml").safe_load(config.read_text())
        data["train"]["num_workers"] = 2
        config.write_text(__import__("yaml").safe_dump(data))
        try:
            submitted = cli("submit", "train", str(config.relative_to(PROJECT_ROOT)),
                            "--address", shared_two_nodes.dashboard, "--follow", "--",
                            "--build-pseudo-masks")
        finally:
            config.unlink()  # the job ran from the copy Ray shipped, not from this file
        job_id = submitted.stdout.splitlines()[0].strip()
        logs = cli("jobs", "logs", job_id, "--address", shared_two_nodes.dashboard)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + logs.stdout[-5000:]
        assert "hIoU" in logs.stdout and "on 2 CPU worker(s)" in logs.stdout
        client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
        (run,) = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["train.num_workers"] == "2"

    def test_pseudo_runs_on_both_nodes_and_survives_losing_one(self, tmp_path, shared_two_nodes):
        # Last on the shared cluster: it kills the worker node.
        cfg = toy_config(tmp_path,
                         data={"toyworld": {"num_train": 40, "num_val": 4, "image_size": 64}},
                         pseudo_masks={"batch_size": 2, "num_actors": 2, "cpus_per_actor": 1.0})
        config = tmp_path / "pseudo.yaml"
        config.write_text(dump_config(cfg))
        shard_dir = cache_dir(cfg, "train") / "shards"
        head, worker = shared_two_nodes.node_ids()
        proc = splitmatch("pseudo", str(config), address=shared_two_nodes.address)
        deadline = time.time() + 300
        while time.time() < deadline:
            # Polled before the shards are read: a run that ends between the two is judged on
            # all its shards, instead of failing the test for having ended.
            running = proc.poll() is None
            if shard_nodes(shard_dir) == {head, worker}:
                break
            assert running, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        assert shard_nodes(shard_dir) == {head, worker}  # an actor on each node
        done_before = len(list(shard_dir.glob("shard-*.npz")))
        killed = shared_two_nodes.kill_worker()
        out, _ = proc.communicate(timeout=400)
        runs = 1
        if proc.returncode != 0:  # Ray could not finish without the node: a rerun does
            rerun = splitmatch("pseudo", str(config), address=shared_two_nodes.address)
            out, _ = rerun.communicate(timeout=400)
            assert rerun.returncode == 0, out[-3000:]
            runs = 2
        manifest = json.loads((shard_dir.parent / "manifest.json").read_text())
        assert manifest["complete"] and manifest["stats"]["processed"] == 40
        assert set(manifest["nodes"]) >= {head, worker}
        assert sum(manifest["nodes"].values()) == 40
        indices = []
        for name in manifest["shards"]:
            with np.load(shard_dir / name) as shard:
                indices += shard["indices"][shard["ok"]].tolist()
        assert sorted(indices) == list(range(40)), "every image exactly once"
        cache = PseudoMaskCache.open(cfg, "train")
        assert all(i in cache for i in range(40))
        print(f"killed worker node {worker[:8]} (pids {killed}) after {done_before} shards; "
              f"{runs} run(s); images per node {manifest['nodes']}")


@pytest.mark.slow
def test_ddp_across_nodes_restarts_from_its_checkpoint_when_a_node_comes_back(tmp_path, two_nodes):
    from mlflow.tracking import MlflowClient

    from splitmatch.tracking import default_tracking_uri

    # One worker per node (1 CPU each): DDP over gloo across the node boundary.
    config = write_config(tmp_path, "ddp", max_iters=12, num_workers=2, cpus_per_worker=1,
                          checkpoint_every=4, eval_every=100, max_failures=2,
                          num_visualizations=0)
    run_dir = tmp_path / "runs" / "ddp"
    proc = splitmatch("train", str(config), "--build-pseudo-masks", address=two_nodes.address)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 400
    while time.time() < deadline and not (snapshot.exists() and "checkpoint_dir_name" in snapshot.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    pids = {rank: int((run_dir / "workers" / f"rank{rank}.pid").read_text()) for rank in (0, 1)}
    killed = two_nodes.kill_worker()
    time.sleep(3)
    two_nodes.add_worker()  # the node is back: the run goes on from its checkpoint
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "restarting from the newest checkpoint (1 of train.max_failures=2)" in out
    assert {int((run_dir / "workers" / f"rank{r}.pid").read_text()) for r in (0, 1)} & set(pids.values()) == set()
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 13))
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_iteration"]) >= 4
    # The progress queue lives where the driver and Ray Train's controllers do: on a node that
    # went, it took the next controller's start (and the run) with it.
    from ray.util.state import list_actors

    nodes = {cls: {a.node_id for a in list_actors(address=two_nodes.dashboard, detail=True,
                                                 filters=[("class_name", "=", cls)])}
             for cls in ("_QueueActor", "TrainController")}
    assert len(nodes["TrainController"]) == 1 and nodes["_QueueActor"] == nodes["TrainController"], nodes
    print(f"killed worker node (pids {killed}) after the first checkpoint; ranks were {pids}")


@pytest.mark.slow
def test_a_run_on_object_storage_shares_nothing_but_the_bucket(tmp_path, s3):
    """Caches, checkpoints and MLflow artifacts in an S3 bucket (a real S3 server on loopback),
    each node with a local folder of its own: pseudo masks from actors on both nodes, DDP over
    both, and a driver that sees the nodes' work only through the bucket."""
    import yaml
    from mlflow.tracking import MlflowClient

    from conftest import TwoNodeCluster
    from splitmatch.tracking import MlflowServer

    mirrors = {name: tmp_path / f"mirror-{name}" for name in ("head", "worker")}
    nodes = TwoNodeCluster(node_env=tuple({**s3.env, "SPLITMATCH_MIRROR": str(mirror)}
                                          for mirror in mirrors.values()))
    server = MlflowServer(tmp_path / "mlflow", artifacts=f"s3://{s3.bucket}/mlartifacts").start()
    try:
        config = write_config(tmp_path, "s3run", max_iters=4, num_workers=2, cpus_per_worker=1,
                              checkpoint_every=2, eval_every=2)
        data = yaml.safe_load(config.read_text())
        data["train"]["storage_path"] = f"s3://{s3.bucket}/runs"
        data["pseudo_masks"].update(cache_dir=f"s3://{s3.bucket}/cache", num_actors=2,
                                    cpus_per_actor=1.0, batch_size=1)
        data["data"]["select_split"] = "val"
        data["tracking"]["uri"] = server.url
        data["storage"] = {"s3_endpoint_url": s3.endpoint}  # the nodes learn it from the config
        config.write_text(yaml.safe_dump(data))
        env = {k: v for k, v in os.environ.items()
               if k not in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitmatch.cli", "train", str(config), "--build-pseudo-masks"],
            env=dict(env, RAY_ADDRESS=nodes.address, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        assert f"run directory: s3://{s3.bucket}/runs/s3run" in out
        assert f"weights chosen on 'val', the ones tested above: s3://{s3.bucket}/runs/s3run/best_model.pt" in out
        assert "is unreachable" not in out  # MLflow took every record, artifacts included

        keys = s3.keys()
        # The pseudo-mask cache: every shard and, last, the manifest, made on both nodes.
        (manifest_key,) = [k for k in keys if k.startswith("cache/") and k.endswith("manifest.json")]
        body = s3.client().get_object(Bucket=s3.bucket, Key=manifest_key)["Body"].read()
        manifest = json.loads(body)
        # Where the actors ran is Ray's choice (both nodes, or the one that started first): the
        # driver, with a folder of its own, saw their shards only through the bucket.
        assert manifest["complete"] and set(manifest["nodes"]) <= set(nodes.node_ids())
        assert sum(manifest["nodes"].values()) == manifest["stats"]["processed"] == 16
        shards = {k.rsplit("/", 1)[1] for k in keys if k.startswith("cache/") and k.endswith(".npz")}
        assert shards == set(manifest["shards"])
        # Each node kept its local copy in its own folder, of what it computed or read.
        for mirror in mirrors.values():
            assert list(mirror.rglob("shard-*.npz")), mirror
        # The run: Ray Train's checkpoint and the driver's and rank 0's files, all in the bucket.
        run = [k[len("runs/s3run/"):] for k in keys if k.startswith("runs/s3run/")]
        assert {"config.yaml", "best_model.pt", "final_metrics.json"} <= set(run)
        assert any(k.startswith("checkpoint_") and k.endswith("/state.pt") for k in run)
        assert (mirrors["worker"] / "s3" / s3.bucket / "runs" / "s3run" / "workers" / "rank1.pid").is_file() \
            or (mirrors["head"] / "s3" / s3.bucket / "runs" / "s3run" / "workers" / "rank1.pid").is_file()
        # MLflow: the run is complete, and its artifacts are objects in the bucket.
        client = MlflowClient(server.url)
        (mlrun,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        assert mlrun.info.status == "FINISHED" and "hIoU" in mlrun.data.metrics, out[-4000:]
        assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")] == [1, 2, 3, 4]
        stored = [k for k in keys if k.startswith("mlartifacts/")]
        assert any(k.endswith("/config.yaml") for k in stored)
        assert any(k.endswith("/artifacts/weights.pt") for k in stored)  # its logged model's
        assert not any(k.endswith("/checkpoints/best_model.pt") for k in stored)  # not twice
        # The selected weights evaluate from the bucket, on a machine that never saw them.
        evaluated = subprocess.run(
            [sys.executable, "-m", "splitmatch.cli", "eval", str(config), "--checkpoint",
             f"s3://{s3.bucket}/runs/s3run/best_model.pt"],
            env=dict(env, SPLITMATCH_MIRROR=str(tmp_path / "mirror-elsewhere")),
            capture_output=True, text=True, timeout=300)
        assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
        assert f"hIoU {mlrun.data.metrics['hIoU']:.2f}" in evaluated.stdout
        print(f"bucket after the run: {len(keys)} objects; images per node {manifest['nodes']}")
    finally:
        server.stop()
        nodes.stop()
