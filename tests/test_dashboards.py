"""`splitmatch compare` against real MLflow stores (SQLite, and a local server over HTTP): runs with
synthetic metrics are logged the way training logs them, then ranked, plotted and reported."""
import base64
import json
import math
import re

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from splitmatch.dashboards.report import build_report
from splitmatch.dashboards.runs import TABLE_COLUMNS
from splitmatch.tracking import MlflowServer, artifact_root, default_tracking_uri

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
    assert result["runs"] == 1 and "no run has an hIoU" in result["message"]
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
