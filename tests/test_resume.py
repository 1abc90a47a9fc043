"""What a resumed or evaluated run reuses is checked: `--resume` under another config is refused by
key (a longer budget is allowed and recorded), `eval` checks the config a checkpoint carries,
and after Ctrl-C the run is KILLED and resumes from the newest complete checkpoint on disk, even
one Ray Train's snapshot does not name."""
import shutil
import signal
import time

import pytest
import torch
import yaml

from splitmatch.tracking import default_tracking_uri
from splitmatch.checkpoints import CheckpointError, load_state, newest_checkpoint
from helpers import cli, cli_in_process, finish, splitmatch, steps, the_run, write_config


def test_newest_checkpoint_is_the_highest_complete_iteration(tmp_path):
    for name, iteration in (("checkpoint_a", 2), ("checkpoint_b", 6), ("checkpoint_c", 4)):
        (tmp_path / name).mkdir()
        torch.save({"model": {}, "iteration": iteration}, tmp_path / name / "state.pt")
    assert newest_checkpoint(tmp_path) == (tmp_path / "checkpoint_b", 6)
    # An interrupt mid-copy leaves a state.pt that does not load: the one before it is newest.
    data = (tmp_path / "checkpoint_b" / "state.pt").read_bytes()
    (tmp_path / "checkpoint_b" / "state.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoint_d").mkdir()  # and one whose file was never written
    assert newest_checkpoint(tmp_path) == (tmp_path / "checkpoint_c", 4)
    # Ray Train's snapshot file sits beside the checkpoints under the same prefix: it is no
    # checkpoint, so it is not named among those passed over.
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    passed_over = []
    assert newest_checkpoint(tmp_path, passed_over) == (tmp_path / "checkpoint_c", 4)
    assert [directory.name for directory, _ in passed_over] == ["checkpoint_b", "checkpoint_d"]
    assert newest_checkpoint(tmp_path / "nothing") is None


class Payload:
    """A crafted pickle: loading it with the full unpickler would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(directory, marker):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "iteration": 8, "payload": Payload(marker)}, directory / "state.pt")
    return directory


def test_a_checkpoint_that_does_not_load_is_passed_over_and_named(tmp_path):
    torch.save({"model": {}, "iteration": 4}, crafted_checkpoint(tmp_path / "checkpoint_a",
                                                                 tmp_path / "x") / "state.pt")
    crafted_checkpoint(tmp_path / "checkpoint_b", tmp_path / "ran")
    passed_over = []
    assert newest_checkpoint(tmp_path, passed_over) == (tmp_path / "checkpoint_a", 4)
    assert [(d.name, why.split(":")[0]) for d, why in passed_over] == [
        ("checkpoint_b", "UnpicklingError")]
    assert "\n" not in passed_over[0][1]  # one line of torch's page-long refusal
    with pytest.raises(CheckpointError, match=r"checkpoint_b/state.pt is not a checkpoint that "
                                              r"loads \(UnpicklingError: "):
        load_state(tmp_path / "checkpoint_b")
    assert not (tmp_path / "ran").exists()  # refused, never run


def test_a_refused_pickle_is_named_by_its_cause_not_by_torchs_advice(tmp_path):
    # torch's weights-only refusal runs to a page: its first line says that loading with
    # weights_only=False "will likely succeed" (the very thing that would run the pickle) and
    # may hold terminal escape codes; its cause comes later.
    refused = "; refused by the weights-only loader"
    crafted = crafted_checkpoint(tmp_path / "checkpoint_a", tmp_path / "ran")
    passed_over = []
    assert newest_checkpoint(tmp_path, passed_over) is None
    why = ("UnpicklingError: Unsupported global: GLOBAL io.open was not an allowed global by "
           "default" + refused)
    assert passed_over == [(crafted, why)]
    with pytest.raises(CheckpointError) as error:
        load_state(crafted)
    assert str(error.value) == f"{crafted / 'state.pt'} is not a checkpoint that loads ({why})"
    json_file = tmp_path / "model.pt"
    json_file.write_text('{"hIoU": 50.0}')
    with pytest.raises(CheckpointError) as error:
        load_state(json_file)
    assert str(error.value) == (f"{json_file} is not a checkpoint that loads (UnpicklingError: "
                                f"Unsupported operand 123{refused})")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("content", ["crafted", "json"])
def test_eval_and_predict_on_a_file_that_is_no_checkpoint_say_so_in_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "crafted":
        torch.save({"model": Payload(tmp_path / "ran")}, path)
    elif content == "json":
        path.write_text('{"hIoU": 50.0}')
    config = write_config(tmp_path, "bad")
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # never read: the checkpoint is refused first
    for args in (["eval", str(config), "--checkpoint", str(path)],
                 ["predict", str(path), str(image), "--classes", "cat,dog", "--out",
                  str(tmp_path / "out")]):
        done = cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
        assert str(path) in lines[0] and ("not a checkpoint" in lines[0]
                                          or "no checkpoint at" in lines[0]), lines[0]
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_resume_checks_the_config_and_eval_checks_the_checkpoint(tmp_path, capsys, ray_cluster,
                                                                 tiny_pseudo_masks):
    config = write_config(tmp_path, "res", tiny_pseudo_masks, max_iters=4, num_workers=1,
                          checkpoint_every=4, eval_every=4, num_visualizations=0)
    data = yaml.safe_load(config.read_text())
    data["data"]["select_split"] = "val"  # so that there is a best_model.pt to check too
    data["train"]["ema_decay"] = 0.5  # and an average of the weights that --resume continues
    config.write_text(yaml.safe_dump(data))
    finish(splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster))
    run_dir = tmp_path / "runs" / "res"
    # The weights chosen on val are an average kept with a checkpoint, not a step's own weights.
    saved = [load_state(path) for path in sorted(run_dir.glob("checkpoint_*")) if path.is_dir()]
    assert [s["weight_average"]["updates"] for s in saved] == [s["iteration"] for s in saved]
    chosen = load_state(run_dir / "best_model.pt")["model"]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert any(same(chosen, s["weight_average"]["weights"]) for s in saved)
    assert not any(same(chosen, s["model"]) for s in saved)

    # Another unseen split on resume would score seen-trained classes as unseen: refused by key.
    # Refusals and evaluations run in this process (cli_in_process): their output is checked.
    code, out = cli_in_process(capsys, "train", config, "--resume", "--set",
                               "data.unseen=[tomato, grape]", "--set", "train.max_iters=6")
    assert code == 2 and "data.unseen: None -> ['tomato', 'grape']" in out, out
    assert "only train.max_iters may grow" in out and "training res" not in out
    code, out = cli_in_process(capsys, "train", config, "--resume", "--set", "train.max_iters=3")
    assert code == 2 and "train.max_iters: 4 -> 3" in out, out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_iters"] == 4

    # A longer budget is allowed, and the stored config and the MLflow run say so.
    out = finish(splitmatch("train", str(config), "--resume", "--set", "train.max_iters=6",
                            address=ray_cluster))
    newest = sorted(run_dir.glob("checkpoint_*"))
    assert "resuming res from checkpoint_" in out and "(iteration 4)" in out, out
    assert "train.max_iters: 4 -> 6 on resume" in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_iters"] == 6
    assert load_state(newest_checkpoint(run_dir)[0])["weight_average"]["updates"] == 6  # went on
    client, mlflow_run = the_run(default_tracking_uri(tmp_path / "runs"))
    assert steps(client, mlflow_run, "loss") == [1, 2, 3, 4, 5, 6]
    assert mlflow_run.data.tags["resumed_with.train.max_iters"] == "4 -> 6"
    logged = client.download_artifacts(mlflow_run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(open(logged))["train"]["max_iters"] == 6

    # eval: the checkpoint carries its config; the original file now differs in the budget.
    checkpoint = str(newest_checkpoint(run_dir)[0])
    code, out = cli_in_process(capsys, "eval", config, "--checkpoint", checkpoint)
    assert code == 2 and "train.max_iters: 6 -> 4" in out and "run's config.yaml" in out, out
    code, out = cli_in_process(capsys, "eval", run_dir / "config.yaml", "--checkpoint",
                               checkpoint, "--set", "data.unseen=[tomato, grape]")
    assert code == 2 and "data.unseen" in out, out
    code, out = cli_in_process(capsys, "eval", run_dir / "config.yaml", "--checkpoint",
                               checkpoint, "--set", "inference.num_random_queries=0")
    assert code == 0, out[-4000:]
    assert f"config checked against {checkpoint}" in out and "hIoU" in out
    assert "evaluating test: 4/4 img (100%)" in out  # its progress display's last line
    code, out = cli_in_process(capsys, "eval", run_dir / "config.yaml", "--checkpoint",
                               run_dir / "best_model.pt")
    assert code == 0 and "config checked against" in out, out[-4000:]
    assert newest  # the run kept its checkpoints through all of the above

    # A newest checkpoint that does not load (here a crafted pickle; Ray's own snapshot names
    # it) is passed over, by name, for the older one that does, and never run.
    newest_dir, iteration = newest_checkpoint(run_dir)
    older = run_dir / "checkpoint_0000-older"
    shutil.copytree(newest_dir, older)
    crafted_checkpoint(newest_dir, tmp_path / "ran")
    out = finish(splitmatch("train", str(config), "--resume", "--set", "train.max_iters=8",
                            address=ray_cluster))
    assert f"passed over {newest_dir}: its state.pt does not load (UnpicklingError" in out, out
    assert out.count("passed over ") == 1, out  # only that one (not Ray's snapshot file)
    assert f"resuming res from {older.name} (iteration {iteration})" in out
    assert not (tmp_path / "ran").exists() and newest_checkpoint(run_dir)[1] == 8


@pytest.mark.slow
def test_ctrl_c_kills_the_run_and_resume_starts_at_the_newest_checkpoint(tmp_path, ray_cluster,
                                                                         tiny_pseudo_masks):
    # Interrupted at iteration 4 or later: 12 iterations and 6 checkpoints are still to come
    # when the signal lands.
    config = write_config(tmp_path, "int", tiny_pseudo_masks, max_iters=16, num_workers=1,
                          checkpoint_every=2, log_every=1, num_visualizations=0)
    run_dir = tmp_path / "runs" / "int"
    proc = splitmatch("train", str(config), "--build-pseudo-masks", address=ray_cluster)
    deadline = time.time() + 300
    while time.time() < deadline and not (newest_checkpoint(run_dir) or (None, 0))[1] >= 4:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted: the MLflow run of int is marked KILLED" in out and "--resume" in out
    uri = default_tracking_uri(tmp_path / "runs")
    client, mlflow_run = the_run(uri)
    assert mlflow_run.info.status == "KILLED"
    logged = steps(client, mlflow_run, "loss")

    # As if the interrupt had come before Ray Train wrote its snapshot: the newest checkpoint
    # on disk is still where the run goes on (Ray alone would start at iteration 0).
    newest_dir, newest_iteration = newest_checkpoint(run_dir)
    (run_dir / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)
    out = finish(splitmatch("train", str(config), "--resume", address=ray_cluster))
    assert f"resuming int from {newest_dir.name} (iteration {newest_iteration})" in out, out
    client, mlflow_run = the_run(uri)
    assert mlflow_run.info.status == "FINISHED"
    assert int(mlflow_run.data.tags["resumed_from_iteration"]) == newest_iteration
    # Steps logged before the interrupt and not checkpointed are redone but not logged twice.
    assert logged and steps(client, mlflow_run, "loss") == list(range(1, 17))
