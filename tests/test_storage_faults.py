"""When the storage under a run fails, the user gets one line naming the location and the cause,
the MLflow run is closed (FAILED), no partial checkpoint is left looking complete, and `--resume`
continues once the storage is back: a full disk (a real size-limited tmpfs), an object store that
goes away mid-run and a bucket that does not exist (the loopback S3 server), and a driver killed
with -9 (its run, left RUNNING, is closed by the next command)."""
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import finish, splitmatch, steps, the_run, write_config
from splitmatch.checkpoints import newest_checkpoint
from splitmatch.tracking import default_tracking_uri


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: a real file system that fills up (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("error:", "config error:"))]


@pytest.mark.slow
def test_a_full_disk_fails_the_run_in_one_line_and_resume_continues(tmp_path, small_disk,
                                                                    ray_cluster,
                                                                    tiny_pseudo_masks):
    # The session's pseudo masks (TINY's, only read), off the small disk.
    config = write_config(tmp_path, "full", tiny_pseudo_masks, max_iters=4, num_workers=1,
                          batch_size=2, checkpoint_every=2, eval_every=4, num_visualizations=0,
                          storage_path=str(small_disk))
    proc = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    out, _ = proc.communicate(timeout=400)
    lines = error_lines(out)
    assert proc.returncode == 1 and len(lines) == 1, out[-4000:]
    assert str(small_disk / "full") in lines[0] and "No space left on device" in lines[0], lines
    assert "--resume" in lines[0] and "Traceback" not in out
    log = lines[0].rsplit("[traceback: ", 1)[1].rstrip("]")
    assert "No space left on device" in open(log).read()  # the traceback went somewhere
    run_dir = small_disk / "full"
    passed_over = []
    newest_checkpoint(run_dir, passed_over)
    assert passed_over == []  # nothing under a checkpoint's name that does not load
    client, run = the_run(default_tracking_uri(small_disk))
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["splitmatch.status"]

    # The disk grows: --resume goes on. Its driver is killed with -9 once training runs again,
    # which leaves the MLflow run RUNNING; the next --resume closes it and finishes the run.
    subprocess.run(["mount", "-o", "remount,size=600m", str(small_disk)], check=True)
    proc = splitmatch("train", str(config), "--resume", address=ray_cluster)
    deadline = time.time() + 300
    while the_run(default_tracking_uri(small_disk))[1].info.status != "RUNNING":
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(2.0)  # the job's workers go with their driver
    assert the_run(default_tracking_uri(small_disk))[1].info.status == "RUNNING"
    out = finish(splitmatch("train", str(config), "--resume", address=ray_cluster))
    assert "the MLflow run of full was left RUNNING by a process that is gone: marked KILLED" in out
    client, run = the_run(default_tracking_uri(small_disk))
    assert run.info.status == "FINISHED" and steps(client, run, "loss")[-1] == 4, out[-3000:]


class Proxy:
    """A TCP relay on loopback in front of the S3 server: stopping it is the store going away
    (connections refused), starting it again on the same port brings the store back, its
    objects intact."""

    def __init__(self, target_port: int):
        from splitmatch.network import free_port

        self.target, self.port = target_port, free_port()
        self.server = None

    def start(self) -> "Proxy":
        import socketserver
        import threading

        target = self.target

        class Relay(socketserver.BaseRequestHandler):
            def handle(self):
                import socket

                upstream = socket.create_connection(("127.0.0.1", target))
                pumps = [threading.Thread(target=_pump, args=pair, daemon=True)
                         for pair in ((self.request, upstream), (upstream, self.request))]
                for pump in pumps:
                    pump.start()
                for pump in pumps:
                    pump.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Relay)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pump(source, sink) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(2)
            except OSError:
                pass


@pytest.mark.slow
def test_an_object_store_that_goes_away_or_has_no_bucket_fails_in_one_line(tmp_path, s3,
                                                                           monkeypatch,
                                                                           tiny_pseudo_masks):
    from splitmatch.tracking import MlflowServer

    proxy = Proxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, endpoint)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance: it has this env
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        # The session's pseudo masks (TINY's, a local folder, only read): the store that goes
        # away is the run's.
        config = write_config(tmp_path, "s3gone", tiny_pseudo_masks, max_iters=6, num_workers=1,
                              batch_size=2, checkpoint_every=2, eval_every=6,
                              num_visualizations=0)
        data = yaml.safe_load(config.read_text())
        data["tracking"]["uri"] = server.url
        data["storage"] = {"s3_endpoint_url": endpoint}
        data["train"]["storage_path"] = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs"
        config.write_text(yaml.safe_dump(data))
        done = subprocess.run([sys.executable, "-m", "splitmatch.cli", "train", str(config),
                               "--build-pseudo-masks"], capture_output=True, text=True,
                              timeout=300)
        lines = error_lines(done.stderr)
        assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
        assert data["train"]["storage_path"] in lines[0] and "bucket" in lines[0], lines

        data["train"]["storage_path"] = f"s3://{s3.bucket}/runs"
        config.write_text(yaml.safe_dump(data))
        proc = subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "train", str(config),
                                 "--build-pseudo-masks"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        # A whole checkpoint (its folder's key comes first, its state.pt when uploaded).
        while not any(key.endswith("/state.pt") for key in s3.keys("runs/s3gone/checkpoint_")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.3)
        proxy.stop()  # the store goes away mid-run
        out, _ = proc.communicate(timeout=400)
        lines = error_lines(out)
        assert proc.returncode == 1 and len(lines) == 1, out[-4000:]
        assert f"s3://{s3.bucket}/runs/s3gone" in lines[0] and "--resume" in lines[0], lines
        assert "Traceback" not in out
        # A whole checkpoint is on the store: the line must not say there is none (the local
        # mirror, which does not hold it, is no witness of what the store has).
        assert "no checkpoint" not in lines[0]
        assert f"the checkpoints it saved are kept under s3://{s3.bucket}/runs/s3gone" in lines[0]
        client = MlflowClient(server.url)
        run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
        assert run.info.status == "FAILED"

        proxy.start()  # the store is back
        out = finish(subprocess.Popen([sys.executable, "-m", "splitmatch.cli", "train",
                                       str(config), "--resume"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        assert "resuming s3gone from checkpoint_" in out
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED" and steps(client, run, "loss")[-1] == 6
    finally:
        server.stop()
        proxy.server.server_close()
