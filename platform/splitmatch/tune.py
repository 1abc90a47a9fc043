"""`splitmatch tune`: hyperparameter search on Ray Tune, each trial a Ray Train run (the training
issue's `launch`, not a copy), one MLflow parent run for the search and one child run per trial.

The V2 pattern (ray-mlflow.md): a function trainable builds a `TorchTrainer` whose
`TuneReportCallback` forwards rank 0's metrics to Tune. Trials are judged on select_hIoU, the hIoU
on `data.select_split`, never on the test split that is reported: ASHA compares the latest one at
its rungs, and the summary ranks finished trials on their best one, the weights they kept and
tested (selection.py, the rule `compare` ranks by too). Trial names are deterministic, so a
restored search resumes unfinished trials from their Train checkpoints and never re-runs finished
ones. Concurrent trials write MLflow through one local `mlflow server`, never one SQLite file.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path

import yaml

from splitmatch import storage
from splitmatch.config import (Config, ConfigError, apply_overrides, config_from_dict, dump_config,
                               redact, resolve_paths, to_dict, tracking_credentials,
                               use_credentials, yaml_value)
from splitmatch.progress import verbose
from splitmatch.search_progress import SearchProgress
from splitmatch.selection import STOPPED_EARLY, describe_state, ranked, selection_figure
from splitmatch.splits import check_split_use
from splitmatch.tracking import (MlflowServer, artifact_root, default_tracking_uri, experiment_id,
                                 find_or_create_run, literal, open_parent_run)


def search_space(space: dict) -> dict:
    """The YAML `tune.space` as Tune distributions, keyed by the flattened config key."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items()
            for kind, values in spec.items()}


def trial_config(base: dict, params: dict, name: str) -> Config:
    """The base config with one trial's sampled values applied (validated like any config)."""
    data = yaml.safe_load(yaml.safe_dump(base))
    overrides = [f"{key}={yaml_value(value)}" for key, value in params.items()]
    data = apply_overrides(data, overrides, source="tune trial")
    data["name"] = name
    data["tune"] = {}
    return config_from_dict(data, f"trial {name}")


def run_trial(config: dict, base: dict, search: str, tracking_uri: str,
              parent_run_id: str, holdout: bool = False,
              credentials: dict[str, str] | None = None) -> None:
    """Tune function trainable: one Ray Train run with this trial's values (`config`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from splitmatch.train import launch

    use_credentials(credentials)

    cfg = trial_config(base, config, f"{search}-{tune.get_context().get_trial_name()}")
    cfg_dict = to_dict(cfg)
    cfg_dict["tracking"]["uri"] = tracking_uri
    cfg = config_from_dict(cfg_dict, "trial")
    try:
        # resume=True: a restored search continues this trial's Train run where it stopped.
        result = launch(cfg, resume=True, build_pseudo_masks=True, may_grow=(),
                        parent_run_id=parent_run_id, callbacks=[TuneReportCallback()],
                        holdout=holdout,
                        log=lambda *_: None, progress=False)  # trials run off the driver

        error = result.error
    except Exception as exc:  # noqa: BLE001 - recorded below, then re-raised for Tune
        error = exc
    if error is not None:
        _mark_failed(tracking_uri, cfg, parent_run_id, error)
        raise RuntimeError(f"trial {cfg.name} failed: {error}") from (
            error if isinstance(error, BaseException) else None)


def _mark_failed(uri: str, cfg: Config, parent_run_id: str, error) -> None:
    """The child run of a failed trial says so (the trial's rank 0 may never have finished it)."""
    from mlflow.tracking import MlflowClient

    from splitmatch.checkpoints import run_key

    client = MlflowClient(uri)
    run_id, _ = find_or_create_run(client, cfg.tracking.experiment, run_key(cfg), cfg.name, parent_run_id,
                                   artifact_location=artifact_root(uri))
    client.set_tag(run_id, "splitmatch.status", "failed")
    client.set_tag(run_id, "error", str(error)[:5000])
    client.set_terminated(run_id, status="FAILED")


def run_search(cfg: Config, resume: bool = False, log=print, holdout: bool = False) -> dict:
    """Run (or, with `resume`, continue) the search of `cfg.tune`; returns a summary. A search
    chooses, so a held-out split is refused unless `holdout` (--holdout, recorded as a tag)."""
    from mlflow.tracking import MlflowClient

    from splitmatch.cluster import init_ray

    cfg = resolve_paths(cfg)
    family, search_dir = _check_search(cfg, resume, holdout)
    _quiet_search_output()
    init_ray(cfg.storage)
    uri, shown, server = _search_tracking(cfg)
    try:
        client = MlflowClient(uri)
        parent_id = _open_search_run(client, uri, cfg, family, holdout)
        tuner = _tuner(cfg, _trainable(cfg, uri, parent_id, holdout), search_dir, resume)
        log(f"search {cfg.name}: {len(cfg.tune.space)} searched keys, MLflow parent run "
            f"{parent_id} at {redact(shown)}")
        summary = _summarize(tuner.fit(), cfg, client, parent_id, search_dir)
        log(_summary_line(cfg, summary))
        log(where_to_look(cfg, uri if server is None else None, client, parent_id,
                          summary["table"]))
        return summary
    finally:
        if server is not None:
            server.stop()


def _check_search(cfg: Config, resume: bool, holdout: bool) -> tuple[str, str]:
    """The split family the search may use and its folder (or s3:// prefix), or the error that
    says why this search cannot start."""
    from ray import tune

    family = check_split_use(cfg.data, "tune", holdout)
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: nothing to search (see experiments/toyworld_search.yaml)")
    if cfg.data.select_split is None:
        raise ConfigError(f"data.select_split is not set: a search must choose on a split other than "
                         f"the reported test split ({cfg.data.test_split!r}); set e.g. "
                         f"--set data.select_split=val")
    search_dir = storage.join(cfg.train.storage_path, cfg.name)
    if storage.exists(search_dir) and not resume:
        raise FileExistsError(f"search '{cfg.name}' already exists in {search_dir}: pass --resume to "
                              f"continue it, or choose another name (--set name=...)")
    if resume and not tune.Tuner.can_restore(search_dir):
        raise FileNotFoundError(f"no search to resume in {search_dir}")
    return family, search_dir


def _quiet_search_output() -> None:
    # MLflow prints a "View run" link per run it ends; for the embedded store's server, which
    # stops with this command, they would point at nothing. The end says where to look instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not verbose():
        # Tune's default loggers include TensorBoard's, whose hint points into Ray's temporary
        # folder; the CSV and JSON ones (a trial's history: `trial_selection_figure`) are given
        # in `_tuner`. A failed trial is told by the display and the summary, not by Tune's
        # traceback.
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        # Tune's newer console output prints its "Configuration for experiment" table and a
        # "View detailed results here" path whatever the verbosity; the older one is silent at
        # verbose=0 (`_tuner`). Read when the search starts, and by the workers of a local
        # instance started after it.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)


def _search_tracking(cfg: Config) -> tuple[str, str, MlflowServer | None]:
    """The tracking URI the trials log to, the one the output names, and the server this command
    started for them, if any."""
    from mlflow.tracking import MlflowClient

    if cfg.tracking.uri is not None:
        return cfg.tracking.uri, cfg.tracking.uri, None
    # One writer for the embedded store: a local server over its SQLite file. The experiment is
    # created directly in the store first, with its file artifact root, so the runs stay readable
    # (artifacts included) through the plain sqlite:/// URI afterwards.
    embedded = default_tracking_uri(cfg.train.storage_path)
    experiment_id(MlflowClient(embedded), cfg.tracking.experiment, artifact_root(embedded))
    server = MlflowServer(cfg.train.storage_path).start()
    # The server's address dies with the command; the store it serves is what to name.
    return server.url, embedded, server


def _open_search_run(client, uri: str, cfg: Config, family: str, holdout: bool) -> str:
    """The search's MLflow parent run, opened (or found again on resume) with its inputs."""
    parent_id, existed = open_parent_run(client, uri, cfg, cfg.name, "search", {
        "split_family": family, **({"holdout_flag": "--holdout"} if holdout else {})})
    if not existed:
        client.log_dict(parent_id, {k: v for k, v in cfg.tune.space.items()}, "search_space.yaml")
        client.log_text(parent_id, dump_config(cfg), "base_config.yaml")
    return parent_id


def _trainable(cfg: Config, uri: str, parent_id: str, holdout: bool):
    """`run_trial` with the search's fixed inputs bound and its resource request."""
    from ray import tune

    base = to_dict(cfg)
    base["tune"] = {}
    # The fixed inputs travel as parameters, not in the search space, so Tune's tables show
    # only the searched values. The trial function only drives its Train run: it asks for no
    # CPU (the Train workers hold the CPUs), only some memory, since Tune refuses an empty
    # resource request.
    return tune.with_resources(
        tune.with_parameters(run_trial, base=base, search=cfg.name, tracking_uri=uri,
                             parent_run_id=parent_id, holdout=holdout,
                             credentials=tracking_credentials()),
        {"CPU": 0, "memory": 256 * 1024 ** 2})


def _tuner(cfg: Config, trainable, search_dir: str, resume: bool):
    """A new Tuner over `cfg.tune`, or with `resume` the stored one, unfinished trials resumed."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # Built on resume too, though the restored Tuner keeps its stored scheduler: a resumed search
    # is held to asha_scheduler's max_iters check like a new one.
    scheduler = asha_scheduler(cfg) if cfg.tune.scheduler == "asha" else None
    param_space = search_space(cfg.tune.space)
    if resume:
        return tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, param_space=param_space)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric="select_hIoU", mode="max", scheduler=scheduler,
                                    num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=cfg.train.storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
            # One display counted in trials; Tune's own tables with --verbose.
            verbose=2 if verbose() else 0,
            callbacks=[] if verbose() else [
                CSVLoggerCallback(), JsonLoggerCallback(),
                SearchProgress(cfg.name, cfg.data.select_split, cfg.train.max_iters,
                               "ASHA" if cfg.tune.scheduler == "asha" else None)]))


def _summary_line(cfg: Config, summary: dict) -> str:
    return (f"{summary['trials']} trials, {summary['errors']} failed, {summary['stopped_early']} "
            f"stopped early; best {summary['best_run_name']} {summary['best_params']}: best hIoU "
            f"{summary['best_select_hIoU']:.2f} on {cfg.data.select_split} (ranked on it, as "
            f"`compare` ranks), {summary['best_hIoU']:.2f} on {cfg.data.test_split} (reported)")


def where_to_look(cfg: Config, server_uri: str | None, client, parent_id: str, table: str) -> str:
    """The end of a search's output: where its trials can be seen after the command, each place
    one that still exists then (the embedded store's server stops with the command)."""
    store = f" --storage-path {cfg.train.storage_path}"
    if server_uri is None:
        return (f"the trials: {table}; compared with plots: splitmatch compare --parent "
                f"{parent_id}{store}; in MLflow's UI: splitmatch ui{store}")
    experiment = client.get_run(parent_id).info.experiment_id
    return (f"the trials: {table}; compared with plots: splitmatch compare --parent {parent_id} "
            f"--tracking-uri {redact(server_uri)}; in MLflow: "
            f"{redact(server_uri).rstrip('/')}/#/experiments/{experiment}/runs/{parent_id}")


def asha_scheduler(cfg: Config):
    """ASHA on `iteration`, whose rungs all lie before the last iteration.

    A trial's last report (at max_iters, with the test figures) comes before its Train run has
    closed its MLflow run; a STOP there ends the run mid-way, left RUNNING. So max_t is one short
    of max_iters, and a trial that survives the last rung is left to finish by itself
    (stop_last_trials=False), instead of being stopped at max_t.
    """
    from ray import tune

    if cfg.train.max_iters < 2:
        raise ConfigError("tune.scheduler: asha needs train.max_iters >= 2: a 1-iteration trial "
                          "has nothing to stop early")
    max_t = cfg.train.max_iters - 1
    return tune.schedulers.ASHAScheduler(
        time_attr="iteration", max_t=max_t, grace_period=min(cfg.tune.grace_period, max_t),
        reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


# The reported figures of every trial, beside the one it is ranked on (`selection_figure`).
SUMMARY_METRICS = ("hIoU", "sIoU", "uIoU", "mIoU", "iteration")


def _summarize(results, cfg: Config, client, parent_id: str, search_dir: str) -> dict:
    """Summary table, ranked as `compare` ranks the trials (selection.ranked), + the best trial's
    config on the parent run; trials their scheduler stopped are closed in MLflow as such."""
    searched = list(cfg.tune.space)
    runs = _trial_runs(client, parent_id)
    stopped_by = "ASHA" if cfg.tune.scheduler == "asha" else None
    rows = []
    for result in results:
        metrics = result.metrics or {}
        run = _trial_run(runs, metrics.get("trial_id"))
        state = _trial_state(result, cfg.train.max_iters)
        if state == STOPPED_EARLY and run is not None:
            _mark_stopped(client, run, stopped_by)
        rows.append({"trial": Path(result.path).name if result.path else "?",
                     "run_name": run.info.run_name if run is not None else "",
                     "state": describe_state(state, metrics.get("iteration"),
                                             _error_text(result.error), stopped_by),
                     **{k: json_value((result.config or {}).get(k)) for k in searched},
                     "select_hIoU": trial_selection_figure(result),
                     **{m: metrics.get(m) for m in SUMMARY_METRICS},
                     "error": _error_text(result.error)[:300]})
    rows = ranked(rows, figure=lambda r: r["select_hIoU"],
                  finished=lambda r: r["state"] == "finished")
    table = storage.local_path(search_dir) / "search_summary.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    client.log_artifact(parent_id, str(table))
    if storage.is_remote(search_dir):
        storage.push(table, storage.join(search_dir, table.name))
    # The first row, if it is a result: a finished trial with a selection figure.
    best = next((r for r in rows[:1] if r["state"] == "finished" and r["select_hIoU"] is not None),
                None)
    chosen = None
    if best is not None:
        # The chosen trial's own config (its run folder and MLflow run): what publishing its
        # results page and model reads (cli.cmd_tune); saved on the parent under another name.
        chosen = trial_config(to_dict(cfg) | {"tune": {}}, searched_values(best, searched),
                              best["run_name"])
        client.log_text(parent_id, dump_config(dataclasses.replace(chosen, name=f"{cfg.name}-best")),
                        "best_config.yaml")
        client.log_metric(parent_id, "best_select_hIoU", best["select_hIoU"])
        client.log_metric(parent_id, "best_test_hIoU", best["hIoU"])
        client.set_tag(parent_id, "best_trial", best["trial"])
        client.set_tag(parent_id, "best_run_name", best["run_name"])
    client.set_terminated(parent_id, status="FINISHED")
    return {"trials": len(rows), "errors": sum(r["state"].startswith("failed") for r in rows),
            "stopped_early": sum(r["state"].startswith("stopped early") for r in rows),
            "best_select_hIoU": best["select_hIoU"] if best else float("nan"),
            "best_hIoU": best["hIoU"] if best else float("nan"),
            "best_run_name": best["run_name"] if best else "",
            "best_params": {k: best[k] for k in searched} if best else {},
            "best_trial_config": chosen,
            "table": str(table), "parent_run_id": parent_id, "rows": rows}


def searched_values(row: dict, searched: list[str]) -> dict:
    """A summary row's searched values as the trial had them (the table holds them as text)."""
    return {k: yaml.safe_load(row[k]) if isinstance(row[k], str) else row[k] for k in searched}


def trial_selection_figure(result) -> float | None:
    """A trial's best select_hIoU over its reports: every report carries the latest evaluation's
    (Tune's schedulers compare those), so `result.metrics`, the last report, is not the best."""
    frame = result.metrics_dataframe
    history = [] if frame is None or "select_hIoU" not in frame else list(frame["select_hIoU"])
    return selection_figure([*history, (result.metrics or {}).get("select_hIoU")])


def _trial_state(result, max_iters: int) -> str:
    """"failed", "finished", or STOPPED_EARLY: no error, but its last report is before the end
    (a trial's last report is at max_iters, with the test figures)."""
    if result.error is not None:
        return "failed"
    iteration = (result.metrics or {}).get("iteration")
    return "finished" if iteration is not None and iteration >= max_iters else STOPPED_EARLY


def _error_text(error) -> str:
    """The exception the trial raised, not Ray's wrapper around it, whose first line only names
    Ray's actor (RayTaskError keeps the original as `cause`)."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None)
    return str(cause if cause is not None else error)


def _trial_runs(client, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment],
                              filter_string=f"tags.mlflow.parentRunId = {literal(parent_id)}")


def _trial_run(children: list, trial_id: str | None):
    """The MLflow child run of Tune trial `trial_id`, or None: run_trial names it
    `<search>-<trial name>`, and Tune names a trial `<trainable>_<trial id>`."""
    if not trial_id:
        return None
    return next((r for r in children if (r.info.run_name or "").endswith(f"_{trial_id}")), None)


def _mark_stopped(client, run, stopped_by: str | None) -> None:
    """Tune ends a stopped trial's Train run where it is: its rank 0 never closes the MLflow run,
    which would stay RUNNING for ever. Say what happened instead."""
    if run.info.status != "RUNNING":
        return
    client.set_tag(run.info.run_id, "splitmatch.status", STOPPED_EARLY)
    if stopped_by:
        client.set_tag(run.info.run_id, "stopped_by", stopped_by)
    client.set_terminated(run.info.run_id, status="KILLED")


def json_value(value):
    """Lists (K-means scale sets) as compact strings so they fit one CSV cell."""
    return yaml_value(value) if isinstance(value, list) else value

