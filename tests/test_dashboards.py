"""`splitmatch compare` against real MLflow stores (SQLite, and a local server over HTTP): runs with
synthetic metrics are logged the way training logs them (and an ablation's children the way
`splitmatch ablation` logs them), then ranked, plotted and reported."""
import base64
import json
import math
import re

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from splitmatch import stats
from splitmatch.dashboards.report import build_report
from splitmatch.dashboards.runs import TABLE_COLUMNS
from splitmatch.tracking import MlflowServer, artifact_root, default_tracking_uri
from helpers import cli

UNSEEN = ["leaf", "starfish", "donut"]
PLOT_NAMES = {"iou_vs_queries.png", "unseen_class_iou.png", "training_curves.png"}


def harmonic(s, u):
    return 2 * s * u / (s + u)


def log_training_run(client, experiment_id, name, queries, norm, scales, seed=0, parent=None,
                     matching="split", extra=0.0):
    """A finished training run: flattened-config params, tags, loss/IoU histories whose last
    evaluation gives the run's final metrics; returns (run id, final hIoU)."""
    tags = {"dataset": "toyworld", "unseen": ",".join(UNSEEN), "matching": matching,
            "git_commit": "abc", "pseudo_cache_key": "k"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {"name": name, "seed": seed, "data.dataset": "toyworld", "matching.mode": matching,
              "model.num_candidate_queries": queries, "model.mfe.norm": norm,
              "model.mfe.enabled": True, "pseudo_masks.scales": json.dumps(scales),
              "optim.lr": 1e-4}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    seen = 60.0 + 0.5 * queries
    unseen = 10.0 + 2.0 * queries + (4.0 if norm == "gn" else 0.0) + len(scales) + extra + 1.5 * seed
    metrics = []
    for step in (10, 20, 30, 40, 50, 60):
        metrics += [Metric("loss", 6.0 * math.exp(-step / 15) + 8.0 / unseen, 0, step),
                    Metric("lr", 1e-4 * (1 - step / 60), 0, step)]
    for step, fraction in ((20, 0.5), (40, 0.8), (60, 1.0)):
        s, u = seen * fraction, unseen * fraction
        metrics += [Metric("sIoU", s, 0, step), Metric("uIoU", u, 0, step),
                    Metric("hIoU", harmonic(s, u), 0, step), Metric("mIoU", (s + u) / 2, 0, step),
                    Metric("IoU/grass", s, 0, step), Metric("IoU/leaf", u + 3, 0, step),
                    Metric("IoU/starfish", u - 3, 0, step)]
        if queries:  # "donut" absent from the val split of the query-free runs: not logged
            metrics.append(Metric("IoU/donut", u, 0, step))
    client.log_batch(run_id, metrics=metrics)
    # What the run's weights were chosen on (selection split): a figure apart from the test hIoU.
    client.set_tag(run_id, "best_select_hIoU", f"{harmonic(seen, unseen) + 1:.4f}")
    client.set_tag(run_id, "splitmatch.status", "finished")
    client.set_terminated(run_id, "FINISHED")
    return run_id, harmonic(seen, unseen)


def log_parent(client, experiment_id, name, kind="search"):
    run_id = client.create_run(experiment_id, run_name=name,
                               tags={"splitmatch.kind": kind}).info.run_id
    # A parent may carry a summary metric; it must still never be ranked.
    client.log_metric(run_id, "hIoU", 99.0, step=0)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """SQLite store: experiment "zss" with a search (parent + 9 trained children + 1 failed child)
    and one stand-alone baseline run; experiment "other" with one run and an empty ablation."""
    root = tmp_path_factory.mktemp("store")
    uri = default_tracking_uri(root)
    client = MlflowClient(uri)
    zss = client.create_experiment("zss", artifact_location=artifact_root(uri))
    other = client.create_experiment("other", artifact_location=artifact_root(uri))
    parent = log_parent(client, zss, "search")
    children = {}
    for queries in (0, 4, 8):
        for norm in ("gn", "bn"):
            name = f"q{queries}-{norm}-s3"
            children[name] = log_training_run(client, zss, name, queries, norm, [6, 8, 10],
                                              parent=parent)
    for queries, seed in ((4, 0), (8, 0), (8, 1)):
        name = f"q{queries}-gn-s2-seed{seed}"
        children[name] = log_training_run(client, zss, name, queries, "gn", [4, 6], seed=seed,
                                          parent=parent)
    failed = client.create_run(zss, run_name="crashed",
                               tags={"mlflow.parentRunId": parent, "unseen": ",".join(UNSEEN)})
    client.log_batch(failed.info.run_id, params=[Param("model.num_candidate_queries", "8"),
                                                 Param("model.mfe.norm", "gn")])
    client.set_terminated(failed.info.run_id, "FAILED")
    baseline = log_training_run(client, zss, "baseline", 4, "gn", [6, 8, 10], matching="baseline",
                                extra=-5.0)
    outsider = log_training_run(client, other, "other-run", 8, "gn", [6, 8, 10], extra=50.0)
    empty_ablation = log_parent(client, other, "ablation", kind="ablation")
    broken = client.create_experiment("broken", artifact_location=artifact_root(uri))
    client.set_terminated(client.create_run(broken, run_name="died-at-start").info.run_id, "FAILED")
    return {"uri": uri, "client": client, "parent": parent, "children": children,
            "failed": failed.info.run_id, "baseline": baseline, "outsider": outsider,
            "empty_ablation": empty_ablation}


def ranked_ids(runs: dict) -> list[str]:
    return [run_id for run_id, _ in sorted(runs.values(), key=lambda item: -item[1])]


def test_ranks_all_training_runs_of_the_experiment_and_writes_the_csv(store, tmp_path):
    result = build_report(store["uri"], tmp_path / "out", experiments=["zss"])
    expected = ranked_ids({**store["children"], "baseline": store["baseline"]}) + [store["failed"]]
    assert result["runs"] == 11
    assert list(result["table"]["run_id"]) == expected  # parent excluded, failed run last
    assert store["parent"] not in set(result["table"]["run_id"])

    csv = pd.read_csv(result["csv"])
    assert list(csv.columns) == TABLE_COLUMNS
    assert list(csv["run_id"]) == expected and list(csv["rank"]) == list(range(1, 12))
    assert csv["hIoU"].iloc[:-1].is_monotonic_decreasing and math.isnan(csv["hIoU"].iloc[-1])
    top = csv.iloc[0]
    best_id, best_hiou = store["children"]["q8-gn-s2-seed1"]
    assert top.run_id == best_id and top.hIoU == pytest.approx(best_hiou)
    assert (top.candidate_queries, top.kmeans_scales, top.mfe_norm, top.seed) == (8, "[4, 6]", "gn", 1)
    assert top.lr == pytest.approx(1e-4) and top.matching == "split" and top.status == "finished"
    assert top.select_hIoU == pytest.approx(best_hiou + 1, abs=1e-3) and top.unseen == "leaf,starfish,donut"
    last = csv.iloc[-1]
    assert (last.run_name, last.status, last.candidate_queries) == ("crashed", "failed", 8)
    assert last.state == "failed" and math.isnan(last.select_hIoU) and top.state == "finished"
    assert csv.set_index("run_name").loc["baseline", "matching"] == "baseline"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        {"report.html", "runs.csv", *PLOT_NAMES})


def test_parent_filter_keeps_only_the_children(store, tmp_path):
    result = build_report(store["uri"], tmp_path / "out", parent_run_id=store["parent"], top_k=3)
    assert list(result["table"]["run_id"]) == ranked_ids(store["children"]) + [store["failed"]]
    assert store["baseline"][0] not in set(result["table"]["run_id"])
    page = open(result["report"], encoding="utf-8").read()
    assert store["parent"] in page and "search" in page
    # Without a named experiment the parent's experiment is searched; all experiments otherwise.
    everything = build_report(store["uri"], tmp_path / "all")
    assert everything["table"]["run_id"].iloc[0] == store["outsider"][0]
    assert store["empty_ablation"] not in set(everything["table"]["run_id"])
    assert set(everything["table"]["experiment"]) == {"zss", "other", "broken"}


def test_plots_are_real_images_and_the_html_embeds_them(store, tmp_path):
    result = build_report(store["uri"], tmp_path / "out", experiments=["zss"], top_k=4)
    assert set(result["plots"]) == PLOT_NAMES and result["skipped_plots"] == {}
    page = open(result["report"], encoding="utf-8").read()
    for name, path in result["plots"].items():
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 900 and image.height >= 500
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # not blank
        data = open(path, "rb").read()
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in page
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", page)  # self-contained
    assert '<table class="runs">' in page and page.count("<tr") == 1 + 11
    for run_id in result["table"]["run_id"]:
        assert run_id in page
    assert store["uri"] in page and "zss" in page and "generated" in page


def test_report_is_logged_as_artifacts_of_the_given_run(store, tmp_path):
    client = store["client"]
    result = build_report(store["uri"], tmp_path / "out", parent_run_id=store["parent"],
                          log_to_run_id=store["parent"])
    assert result["logged_to"] == store["parent"]
    logged = {a.path for a in client.list_artifacts(store["parent"], "compare")}
    assert logged == {f"compare/{name}" for name in ("report.html", "runs.csv", *PLOT_NAMES)}
    local = client.download_artifacts(store["parent"], "compare/runs.csv", str(tmp_path))
    assert open(local).read() == open(result["csv"]).read()


def test_no_matching_runs_gives_a_message_and_writes_nothing(store, tmp_path):
    out = tmp_path / "out"
    result = build_report(store["uri"], out, experiments=["nope"])
    assert result["runs"] == 0 and "no runs found" in result["message"] and "nope" in result["message"]
    result = build_report(store["uri"], out, parent_run_id=store["empty_ablation"],
                          log_to_run_id=store["empty_ablation"])
    assert result["runs"] == 0 and store["empty_ablation"] in result["message"]
    assert not store["client"].list_artifacts(store["empty_ablation"])
    missing = tmp_path / "absent" / "mlflow.db"
    result = build_report(f"sqlite:///{missing}", out)
    assert result["runs"] == 0 and str(missing) in result["message"] and not missing.exists()
    assert not out.exists()


def test_runs_without_any_metric_give_a_table_and_no_plots(store, tmp_path):
    global_uri = mlflow.get_tracking_uri()
    result = build_report(store["uri"], tmp_path / "out", experiments=["broken"])
    assert result["runs"] == 1 and "no finished run has a selection figure" in result["message"]
    assert result["plots"] == {} and set(result["skipped_plots"]) == PLOT_NAMES
    assert list(result["table"]["run_name"]) == ["died-at-start"]
    page = open(result["report"], encoding="utf-8").read()
    assert "Not drawn" in page and "data:image/png" not in page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "runs.csv"]
    assert mlflow.get_tracking_uri() == global_uri  # the process-wide URI is left alone


@pytest.mark.integration
def test_against_a_real_mlflow_server(tmp_path):
    with MlflowServer(tmp_path / "server") as server:
        client = MlflowClient(server.url)
        experiment = client.create_experiment("tune")
        parent = log_parent(client, experiment, "search")
        children = {name: log_training_run(client, experiment, name, queries, norm, [6, 8, 10],
                                           parent=parent)
                    for name, queries, norm in (("a", 0, "gn"), ("b", 8, "bn"), ("c", 4, "gn"))}
        result = build_report(server.url, tmp_path / "out", experiments=["tune"],
                              parent_run_id=parent, top_k=2, log_to_run_id=parent)
        assert list(result["table"]["run_id"]) == ranked_ids(children)
        assert set(result["plots"]) == PLOT_NAMES
        logged = {a.path for a in client.list_artifacts(parent, "compare")}
        assert "compare/report.html" in logged and len(logged) == 5
        assert server.url in open(result["report"], encoding="utf-8").read()


# ------------------------------------------------------------------ ranking on the selection figure

def log_trial(client, experiment_id, parent, name, select_history, test_hiou, status="FINISHED",
              tags=None):
    """A search trial as train_loop.py leaves it: select_hIoU at each evaluation (NaN ones are not
    logged), the tag best_select_hIoU and the test figures only when rank 0 closed the run."""
    run_id = client.create_run(experiment_id, run_name=name,
                               tags={"mlflow.parentRunId": parent, **(tags or {})}).info.run_id
    steps = [100, 200]
    metrics = [Metric("select_hIoU", v, 0, step) for v, step in zip(select_history, steps)]
    metrics += [Metric("iteration", step, 0, step) for step in steps]
    if status == "FINISHED":
        metrics += [Metric("hIoU", test_hiou, 0, 200), Metric("sIoU", test_hiou + 10, 0, 200)]
        if select_history:
            client.set_tag(run_id, "best_select_hIoU", f"{max(select_history):.4f}")
    client.log_batch(run_id, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    """The reviewer's case: the Ku=0 trial's best select_hIoU (2.91, early) is above the Ku=8
    trial's (2.04, its last), whose test hIoU is the higher one; then trials that did not finish
    and one trained without a selection split."""
    uri = default_tracking_uri(tmp_path_factory.mktemp("trials"))
    client = MlflowClient(uri)
    experiment = client.create_experiment("search", artifact_location=artifact_root(uri))
    parent = log_parent(client, experiment, "toy")
    ids = {
        "ku0": log_trial(client, experiment, parent, "ku0", [2.91, 1.20], test_hiou=5.0),
        "ku8": log_trial(client, experiment, parent, "ku8", [1.00, 2.04], test_hiou=9.0),
        "no-select": log_trial(client, experiment, parent, "no-select", [], test_hiou=30.0),
        # Not closed by rank 0: a figure from its history, but it ranks after every finished run.
        "running": log_trial(client, experiment, parent, "running", [1.5, 4.0], 0, "RUNNING"),
        "stopped": log_trial(client, experiment, parent, "stopped", [0.5, 0.7], 0, "KILLED",
                             {"splitmatch.status": "stopped_early", "stopped_by": "ASHA"}),
        "failed": log_trial(client, experiment, parent, "failed", [], 0, "FAILED",
                            {"error": "RuntimeError: weights missing\nTraceback ..."}),
    }
    return {"uri": uri, "client": client, "parent": parent, "ids": ids}


def test_runs_rank_on_their_best_selection_figure_with_the_test_figures_beside(trials, tmp_path):
    result = build_report(trials["uri"], tmp_path / "out", parent_run_id=trials["parent"])
    table = result["table"]
    # Finished runs by figure, then unfinished ones by figure, then the rest newest first.
    assert list(table["run_name"]) == ["ku0", "ku8", "running", "stopped", "failed", "no-select"]
    ranked = table.set_index("run_name")
    # The best over evaluations, not the last; the higher test hIoU (ku8, no-select) ranks below.
    assert ranked.loc["ku0", "select_hIoU"] == pytest.approx(2.91)
    assert ranked.loc["ku8", "select_hIoU"] == pytest.approx(2.04)
    assert ranked.loc["ku8", "hIoU"] > ranked.loc["ku0", "hIoU"]
    assert ranked.loc["running", "select_hIoU"] == pytest.approx(4.0)  # its history's best
    assert math.isnan(ranked.loc["no-select", "select_hIoU"])
    assert ranked.loc["no-select", "hIoU"] == 30.0  # the highest test figure, ranked after all
    assert dict(ranked["state"]) == {
        "ku0": "finished", "ku8": "finished", "running": "running (iteration 200)",
        "stopped": "stopped early at iteration 200 (ASHA)", "no-select": "finished",
        "failed": "failed: RuntimeError: weights missing"}
    assert "best ku0: best hIoU 2.91 on the selection split" in result["message"]
    page = open(result["report"], encoding="utf-8").read()
    assert "Runs ranked on their selection figure" in page and "no selection figure" in page
    assert "2 run(s) have no selection figure" in page
    assert "stopped early at iteration 200 (ASHA)" in page
    printed = result["text"].splitlines()
    assert printed[0].split()[:3] == ["rank", "select_hIoU", "hIoU"]
    assert "ku0" in printed[1] and "2.91" in printed[1]


# ------------------------------------------------------------------------------ ablation parents

ROWS = ["baseline", "+SM", "+SM+MFE"]
PAIRS = [(split, seed) for split in ("dev0", "dev1") for seed in (0, 1)]
WOBBLE = [1.0, -1.0, 0.5, -0.5]  # +SM against baseline, per pair: its interval contains 0


def ablation_figures(row: str, position: int) -> dict[str, float]:
    """Test and val figures of one (row, pair): +SM the baseline give or take a point, +SM+MFE
    exactly +10 on +SM at every pair, the val figures 3 points under the test ones."""
    split, seed = PAIRS[position]
    base = {"hIoU": 40.0 + 4 * int(split[-1]) + seed, "sIoU": 60.0 + seed,
            "uIoU": 30.0 + 3 * int(split[-1])}
    shift = {"baseline": 0.0, "+SM": WOBBLE[position], "+SM+MFE": WOBBLE[position] + 10}[row]
    test = {k: v + shift for k, v in base.items()}
    return {**test, **{f"final_select_{k}": v - 3 for k, v in test.items()}}


def log_ablation(client, experiment_id, name, reported_split, **tags):
    parent = client.create_run(experiment_id, run_name=name, tags={
        "splitmatch.kind": "ablation", "reported_split": reported_split,
        "row_order": " | ".join(ROWS), **tags}).info.run_id
    for row in ROWS:
        for position, (split, seed) in enumerate(PAIRS):
            child = client.create_run(experiment_id, run_name=f"{name}-{row}-{split}-s{seed}",
                                      tags={"mlflow.parentRunId": parent, "row": row,
                                            "split": split}).info.run_id
            client.log_batch(child, params=[Param("seed", str(seed))], metrics=[
                Metric(k, v, 0, 6) for k, v in ablation_figures(row, position).items()])
            client.set_terminated(child, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    uri = default_tracking_uri(tmp_path_factory.mktemp("ablations"))
    client = MlflowClient(uri)
    experiment = client.create_experiment("ablation", artifact_location=artifact_root(uri))
    return {"uri": uri, "client": client,
            "test": log_ablation(client, experiment, "toy-ablation", "test"),
            "val": log_ablation(client, experiment, "toy-ablation-dev", "val"),
            # VOC's test split is named "val": the family of the splits says which is reported.
            "voc": log_ablation(client, experiment, "voc-ablation", "val", family="holdout")}


@pytest.mark.parametrize("parent,reported", [("test", "test"), ("val", "val"), ("voc", "test")])
def test_an_ablation_parent_gives_one_line_per_row_with_intervals(ablations, tmp_path, parent,
                                                                  reported):
    result = build_report(ablations["uri"], tmp_path / "out", parent_run_id=ablations[parent],
                          log_to_run_id=ablations[parent])
    table = result["table"]
    assert result["kind"] == "ablation" and result["runs"] == 12
    assert list(table["row"]) == ROWS and list(table["pairs"]) == [4, 4, 4]
    prefix = "" if reported == "test" else "final_select_"
    for row in ROWS:
        line = table.set_index("row").loc[row]
        for metric in ("hIoU", "sIoU", "uIoU"):
            logged = [ablation_figures(row, i)[prefix + metric] for i in range(len(PAIRS))]
            assert line[metric] == pytest.approx(np.mean(logged), abs=1e-4)
            assert line[f"{metric} ci95 lo"] <= line[metric] <= line[f"{metric} ci95 hi"]
    assert (table["interval"] == stats.INTERVAL).all()
    lines = table.set_index("row")
    assert math.isnan(lines.loc["baseline", "hIoU vs baseline"])  # the baseline has no deltas
    # +SM: a point either way at every pair: its interval contains 0, so it is not shown.
    assert lines.loc["+SM", "hIoU vs baseline"] == pytest.approx(0.0, abs=1e-9)
    assert not lines.loc["+SM", "hIoU vs baseline shown"]
    # +SM+MFE: +10 on +SM at every pair: shown, interval [10, 10].
    assert lines.loc["+SM+MFE", "hIoU vs previous"] == pytest.approx(10.0)
    assert lines.loc["+SM+MFE", "hIoU vs previous shown"]
    assert lines.loc["+SM+MFE", "hIoU vs previous ci95 lo"] == pytest.approx(10.0)
    assert pd.read_csv(result["csv"])["row"].tolist() == ROWS

    text = result["text"]
    sm, full = (next(l for l in text.splitlines() if l.strip().startswith(r)) for r in
                ("+SM ", "+SM+MFE"))
    assert "not shown" in sm and "+10.00 [10.00, 10.00]" in full
    assert "not shown" not in full  # +10 give or take a point on the baseline: shown too
    assert stats.INTERVAL in text
    assert {"test": "figures on test, the test split", "val": "figures on val, the selection split",
            "voc": "figures on val, the test split"}[parent] in text
    page = open(result["report"], encoding="utf-8").read()
    assert "not shown" in page and stats.INTERVAL in page and "+10.00 [10.00, 10.00]" in page
    assert set(result["plots"]) == {"row_intervals.png"} and result["skipped_plots"] == {}
    with Image.open(result["plots"]["row_intervals.png"]) as image:
        assert image.format == "PNG" and image.width >= 900
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert page.count("data:image/png;base64,") == 1
    logged = {a.path for a in ablations["client"].list_artifacts(ablations[parent], "compare")}
    assert logged == {"compare/report.html", "compare/runs.csv", "compare/row_intervals.png"}


def test_compare_prints_the_ablation_rows(ablations, tmp_path):
    done = cli("compare", "--tracking-uri", ablations["uri"], "--parent", ablations["test"],
               "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["row", "pairs", "hIoU", "sIoU", "uIoU"]
    assert [line.split()[0] for line in lines[1:4]] == ROWS
    assert "not shown" in lines[2] and stats.INTERVAL in done.stdout
    print(done.stdout)
