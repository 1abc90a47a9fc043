"""`splitmatch` command line: one thin subcommand per capability over library calls."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from splitmatch.config import ConfigError, dump_config, load_config
from splitmatch.errors import RunFailed, Terminated, UserError, sigterm_as_interrupt



def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, or the name of a packaged one "
                                        "(toyworld, voc_preset, ...: `splitmatch init` copies them)")
    _add_overrides(parser)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.num_candidate_queries=20 "
                             "(repeatable; values are parsed as YAML)")


def _add_cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS",
                                                            "http://127.0.0.1:8265"),
                        help="the cluster's dashboard (Ray Job API) address")
    parser.add_argument("--token", default=None,
                        help="cluster auth token (default: RAY_AUTH_TOKEN or ~/.ray/auth_token)")


HOLDOUT_HELP = ("the config's split is a held-out one and the figures are for reporting: "
                "without it, held-out splits are refused (recorded on the MLflow run)")


def _config(args):
    """The command's config, with `clip.pretrained: toy` replaced by the (cached) toy CLIP."""
    from splitmatch.storage import use_endpoint
    from splitmatch.toyclip import with_toy_clip
    cfg = load_config(args.config, args.overrides)
    use_endpoint(cfg.storage.s3_endpoint_url)
    if cfg.model.backbone_weights == "imagenet":
        # Before the toy CLIP's minutes of pretraining: offline, this fails in seconds.
        from splitmatch.model.backbone import imagenet_weights_file
        imagenet_weights_file(cfg.model.backbone)
    return with_toy_clip(cfg)


def _as_typed(args) -> str:
    """The config and its --set overrides as a shell would take them back: what a command this
    one suggests (`splitmatch pseudo ...`) must repeat to work on the same config."""
    import shlex
    return shlex.join([args.config, *(a for item in args.overrides for a in ("--set", item))])


def cmd_config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_train(args) -> int:
    from splitmatch import storage
    from splitmatch.config import resolve_paths
    from splitmatch.checkpoints import BEST_MODEL
    from splitmatch.checkpoints import run_location
    from splitmatch.publish import publish_results
    from splitmatch.train import launch
    cfg = _config(args)
    result = launch(cfg, resume=args.resume, build_pseudo_masks=args.build_pseudo_masks,
                    config_path=_as_typed(args), holdout=args.holdout)
    if result.error is not None:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print(f"test split {cfg.data.test_split!r}: " + "hIoU {:.2f}  sIoU {:.2f}  uIoU {:.2f}  mIoU {:.2f}".format(
        *(metrics.get(k, float("nan")) for k in ("hIoU", "sIoU", "uIoU", "mIoU"))))
    location = run_location(resolve_paths(cfg))  # Ray's result.path drops an s3:// scheme
    print(f"run directory: {location}")
    if result.checkpoint is not None:
        print(f"last checkpoint: {storage.join(location, Path(result.checkpoint.path).name)}")
    best = storage.join(location, BEST_MODEL)
    if cfg.data.select_split and storage.exists(best):
        print(f"weights chosen on {cfg.data.select_split!r}, the ones tested above: {best}")
    publish_results(cfg)
    return 0


def cmd_tune(args) -> int:
    from splitmatch.publish import publish_results
    from splitmatch.tune import run_search
    summary = run_search(_config(args), resume=args.resume, holdout=args.holdout)
    if summary["best_trial_config"] is not None:  # the chosen trial's page and MLflow model
        publish_results(summary["best_trial_config"])
    return 0


def cmd_compare(args) -> int:
    import splitmatch.tracking  # noqa: F401  (fail fast against a dead server, not minutes of retries)
    from splitmatch.dashboards.report import build_report
    uri = args.tracking_uri or f"sqlite:///{(Path(args.storage_path) / 'mlflow.db').resolve()}"
    report = build_report(uri, args.out, experiments=args.experiment or None,
                          parent_run_id=args.parent, top_k=args.top_k,
                          log_to_run_id=args.parent if args.log_to_parent else None)
    if not report["runs"]:
        print(report["message"])
        return 1
    print(report["text"])  # the ranked runs, or an ablation's rows with their intervals
    print(f"report: {report['report']}  table: {report['csv']}")
    return 0


def cmd_submit(args) -> int:
    from splitmatch import jobs
    load_config(args.config, args.overrides)  # a broken config fails here, before submitting
    job_id = jobs.submit(args.kind, args.config, args.address, args.overrides, args.extra,
                         token=args.token, submission_id=args.submission_id)
    print(job_id)
    if args.follow:
        status = jobs.follow(args.address, job_id, args.token)
        print(f"job {job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args) -> int:
    from splitmatch import jobs
    client = jobs.client(args.address, args.token)
    if args.action == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}\t{job.status.value}\t{job.entrypoint}")
        return 0
    if not args.job_id:
        print(f"error: 'jobs {args.action}' needs a job id", file=sys.stderr)
        return 2
    if args.action == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.action == "logs":
        if args.follow:
            status = jobs.follow(args.address, args.job_id, args.token)
            print(f"job {args.job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        print(client.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        print("stopped" if client.stop_job(args.job_id) else "already finished")
    return 0


def cmd_toy_clip(args) -> int:
    from splitmatch.storage import use_endpoint
    from splitmatch.toyclip import main_toy_clip
    cfg = load_config(args.config, args.overrides)
    use_endpoint(cfg.storage.s3_endpoint_url)
    main_toy_clip(cfg, shipped=not args.pretrain)
    return 0


def cmd_demo(args) -> int:
    from splitmatch.demo import DEMO_CONFIG, run_demo
    run_demo(args.config or DEMO_CONFIG, quick=args.quick, overrides=args.overrides)
    return 0


def cmd_init(args) -> int:
    from splitmatch.examples import copy_examples
    written = copy_examples(args.folder)
    configs = [path for path in written if path.parent.name == "experiments"]
    jobs = [path.name for path in written if path.parent.name == "jobs"]
    folder = Path(args.folder)
    print(f"{len(configs)} example configs in {folder / 'experiments'}, the cluster job files "
          f"{', '.join(jobs)} in {folder / 'jobs'}")
    print(f"edit them and run from {folder}, e.g. splitmatch train experiments/toyworld.yaml "
          f"(splitmatch submit takes that folder to the cluster)")
    return 0


def cmd_ablation(args) -> int:
    from splitmatch.ablation import run_ablation
    result = run_ablation(_config(args), seeds=args.seeds, splits=args.splits,
                          holdout=args.holdout, table=args.table, rows=args.rows,
                          holdout_from=args.holdout_from)
    return 0 if result else 1


def cmd_diagnose(args) -> int:
    from splitmatch.diagnose import run_diagnose
    run_diagnose(_config(args), split=args.split, seed=args.seed, holdout=args.holdout)
    return 0


def cmd_eval(args) -> int:
    from splitmatch.splits import check_split_use
    from splitmatch.checkpoint_evaluation import evaluate_checkpoint
    cfg = _config(args)
    check_split_use(cfg.data, "eval", args.holdout)
    evaluate_checkpoint(cfg, args.checkpoint, args.out)
    return 0


def cmd_splits(args) -> int:
    from splitmatch.splits import draw_family
    for split in draw_family(args.dataset, args.family, args.count):
        print(f"{split.label:<10} {', '.join(split.unseen):<40} "
              + " ".join(f"--set '{o}'" for o in split.overrides()))
    return 0


def cmd_ui(args) -> int:
    import time

    from splitmatch.tracking import MlflowServer, runs_view_urls

    store = Path(args.storage_path)
    if not (store / "mlflow.db").is_file():
        raise FileNotFoundError(f"no MLflow store at {store / 'mlflow.db'}: train something first, "
                                f"or point --storage-path at train.storage_path of your runs")
    server = MlflowServer(store, port=args.port).start()
    print(f"MLflow UI for {store.resolve()}: {server.url} (Ctrl-C stops it)", flush=True)
    try:
        for name, url in runs_view_urls(server.url).items():
            print(f"  experiment {name!r}, runs with hIoU, sIoU, uIoU: {url}", flush=True)
        while server.process.poll() is None:
            time.sleep(0.5)
        raise RuntimeError(f"the MLflow UI stopped; see {store / 'mlflow_server.log'}")
    finally:
        server.stop()


def cmd_predict(args) -> int:
    from splitmatch.predict import predict
    predict(args.checkpoint, args.inputs, args.classes, args.out, use_ray=True if args.ray else None,
            max_image_side=args.max_image_side)
    return 0


def cmd_sync_mlflow(args) -> int:
    from splitmatch.tracking import replay
    from splitmatch.publish import publish_results
    replayed = replay(args.offline_file, uri=args.tracking_uri)
    if replayed["finished"]:  # what the run could not log at its end: its page and its model
        config = Path(args.offline_file).with_name("config.yaml")
        if not config.is_file():
            print(f"no results page or MLflow model: {config} is gone; `splitmatch train "
                  f"CONFIG --resume` with the run's config logs them")
            return 0
        publish_results(load_config(config, [f"tracking.uri={replayed['uri']}"]))
    return 0


def cmd_pseudo(args) -> int:
    from splitmatch.pseudo.pipeline import run_pseudo
    manifest = run_pseudo(_config(args), split=args.split)
    return 0 if manifest["complete"] else 1


def cmd_bench(args) -> int:
    if args.what == "matching":
        from splitmatch.bench.matching import run
        run(repeats=args.repeats)
    elif args.what == "train":
        from splitmatch.bench.train import TOY_CONFIG, run, run_in_process
        if args.paired:
            from splitmatch.bench.paired import run_paired
            run_paired(rounds=args.rounds, iterations=args.iterations,
                       config=args.config or TOY_CONFIG, overrides=args.overrides)
        elif args.in_process:
            run_in_process(iterations=args.iterations, config=args.config or TOY_CONFIG,
                           overrides=args.overrides, device=args.device)
        else:
            workers = tuple(int(n) for n in args.workers.split(","))
            run(iterations=args.iterations, workers=workers, config=args.config or TOY_CONFIG,
                overrides=args.overrides)
    elif args.what == "pseudo":
        from splitmatch.bench.pseudo import run
        run(num_images=args.images, clip_name=args.clip, repeats=args.repeats, device=args.device,
            config=args.config, overrides=args.overrides)
    elif args.what == "predict":
        from splitmatch.bench.predict import run
        run(side=args.size, max_image_side=args.max_image_side)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitmatch", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Split Matching for inductive zero-shot semantic segmentation.")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Ray Train's own log lines and per-report dicts")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("config", "print the resolved config (defaults + file + --set)", cmd_config)
    _add_config_args(p)

    p = command("train", "train on Ray Train, tracked in MLflow", cmd_train)
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run train.storage_path/name from its latest checkpoint")
    p.add_argument("--build-pseudo-masks", action="store_true",
                   help="build the pseudo-mask cache first if it is missing (splitmatch pseudo)")
    p.add_argument("--holdout", action="store_true",
                   help=HOLDOUT_HELP)

    p = command("tune", "hyperparameter search on Ray Tune (tune: section of the config)", cmd_tune)
    _add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search without re-running finished trials")
    p.add_argument("--holdout", action="store_true",
                   help=HOLDOUT_HELP)

    p = command("compare", "rank and plot runs from MLflow into an HTML report", cmd_compare)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store or server (default: the embedded store of --storage-path)")
    p.add_argument("--storage-path", default="runs", help="train.storage_path of the runs")
    p.add_argument("--experiment", action="append", default=[],
                   help="experiment name (repeatable; default: the parent's, else all)")
    p.add_argument("--parent", default=None,
                   help="only the child runs of this search run id; an ablation's parent run "
                        "gives one line per row, with 95%% intervals")
    p.add_argument("--top-k", type=int, default=5, help="best runs shown in the detail plots")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--log-to-parent", action="store_true",
                   help="also log the report as artifacts of the --parent run")

    p = command("ui", "the MLflow UI of the run store, on 127.0.0.1", cmd_ui)
    p.add_argument("--storage-path", default="runs", help="train.storage_path of the runs")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")

    p = command("submit", "run pseudo/train/tune/eval as a Ray Job on a cluster", cmd_submit)
    p.add_argument("kind", choices=["pseudo", "train", "tune", "eval"], help="the command to run")
    _add_config_args(p)
    _add_cluster_args(p)
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray's)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.epilog = "Options after a lone -- go to the command itself, e.g. -- --resume."

    p = command("jobs", "list, inspect, follow or stop cluster jobs", cmd_jobs)
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", default=None)
    _add_cluster_args(p)
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    p = command("toy-clip", "pretrain (once) the toy CLIP used on the toy world", cmd_toy_clip)
    _add_config_args(p)
    p.add_argument("--pretrain", action="store_true",
                   help="leave out the weights splitmatch ships for this key: pretrain "
                        "here unless the cache has them")

    p = command("demo", "the whole method end to end on the toy world (CPU, local)", cmd_demo)
    p.add_argument("--quick", action="store_true", help="a smaller budget (smoke test, ~3 min)")
    p.add_argument("--config", default=None,
                   help="default: the packaged toyworld config, run on the demo's budget "
                        "(ResNet-10, 500 iterations at lr 6e-4; --set changes it)")
    _add_overrides(p)

    p = command("init", "copy the example configs and cluster job files out for editing",
                cmd_init)
    p.add_argument("folder", nargs="?", default=".",
                   help="where experiments/ and jobs/ go (nothing there is overwritten)")

    p = command("ablation", "an ablation table (rows alike, intervals over splits and seeds)",
                cmd_ablation)
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=1, help="repeat over seeds seed..seed+N-1")
    p.add_argument("--splits", type=int, default=0, metavar="N",
                   help="the first N development splits (`splitmatch splits`); reports their "
                        "val figures, on which choices are made (0: one, unless --holdout)")
    p.add_argument("--holdout", type=int, default=0, metavar="K",
                   help="the first K held-out splits instead; reports their test figures "
                        "(for reporting only, once every choice is made)")
    p.add_argument("--holdout-from", type=int, default=0, metavar="N",
                   help="with --holdout: skip the first N held-out splits (a held-out split is "
                        "read once: a later read takes fresh ones)")
    p.add_argument("--table", default="2", choices=("2", "3", "4", "paper"),
                   help="the paper's Table 2 (baseline, +SM, +MFE, +RQ), 3 (candidate embedding: "
                        "Fu, Fu+MLP, Cu), 4 (MFE norm: none, BN, GN), or 'paper': the config "
                        "(the project's preset), each of its deviations from the paper switched "
                        "off, and the paper as written")
    p.add_argument("--rows", default=None, metavar="ROW,ROW",
                   help="only these rows of the table, in its order (comma-separated names, e.g. "
                        "'preset,preset - candidate negatives'); the first is the one the others "
                        "are compared with")

    p = command("diagnose", "where one ablation split's results come from (queries, confusions, "
                            "candidates, CLIP)", cmd_diagnose)
    _add_config_args(p)
    p.add_argument("--split", default="dev0",
                   help="the ablation's split: dev<N> (or holdout<N> with --holdout)")
    p.add_argument("--holdout", action="store_true",
                   help=HOLDOUT_HELP)

    p.add_argument("--seed", type=int, default=None, help="ablation seed (default: the config's)")

    p = command("splits", "list development or held-out unseen-class splits", cmd_splits)
    p.add_argument("--dataset", default="toyworld", choices=("toyworld", "voc", "coco_stuff"))
    p.add_argument("--family", default="dev", choices=("dev", "holdout"),
                   help="dev: for every choice (on val); holdout: for reported figures only")
    p.add_argument("--count", "-n", type=int, default=6, help="how many")

    p = command("eval", "evaluate a checkpoint on the validation split", cmd_eval)
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, its state.pt, or a model state dict (best_model.pt)")
    p.add_argument("--out", default=None, help="CSV file for the per-class IoU")
    p.add_argument("--holdout", action="store_true",
                   help=HOLDOUT_HELP)

    p = command("predict", "segment your own images with any vocabulary", cmd_predict)
    p.add_argument("checkpoint", help="a run's best_model.pt, or one of its checkpoint_* folders")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--classes", required=True,
                   help="comma-separated class names, any words CLIP knows, e.g. 'cat,dog,sky'")
    p.add_argument("--out", required=True, help="folder for the label PNGs and colour overlays")
    p.add_argument("--ray", action="store_true",
                   help="spread the images over Ray Data actors (automatic for large folders)")
    p.add_argument("--max-image-side", type=int, default=None, metavar="PIXELS",
                   help="segment larger images scaled down to this longer side, their label "
                        "maps scaled back up (default: the checkpoint's inference.max_image_side, "
                        "1536; 0: no limit)")

    p = command("sync-mlflow", "replay MLflow records a run could not send", cmd_sync_mlflow)
    p.add_argument("offline_file", help="the run's mlflow_offline.jsonl")
    p.add_argument("--tracking-uri", default=None,
                   help="send them here instead of the URI the run used")

    p = command("pseudo", "build the CLIP pseudo-mask cache on Ray Data (resumable)", cmd_pseudo)
    _add_config_args(p)
    p.add_argument("--split", default=None, help="dataset split (default: data.train_split)")

    p = command("bench", "print benchmark figures", cmd_bench)
    p.add_argument("what", choices=["matching", "pseudo", "train", "predict"],
                   help="which benchmark")
    p.add_argument("--iterations", type=int, default=40, help="train: iterations per run")
    p.add_argument("--config", default=None,
                   help="train, pseudo: config to time (default: the toy set-up)")
    p.add_argument("--workers", default="1,2", help="train: worker counts to time, e.g. 1,2")
    p.add_argument("--in-process", action="store_true",
                   help="train: time one worker of the config in this process, without Ray")
    p.add_argument("--paired", action="store_true",
                   help="train: the config in-process and on Ray Train, alternating: the median "
                        "step of each, their ratio, Ray Train's start-up and finish by phase")
    p.add_argument("--rounds", type=int, default=3,
                   help="train --paired: in-process / Ray Train pairs")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="train, pseudo: config override (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is kept)")
    p.add_argument("--images", type=int, default=8, help="pseudo: toy images in the batch")
    p.add_argument("--clip", default="ViT-B-16",
                   help="pseudo: open_clip model (random init) or 'tiny' for the test CLIP")
    p.add_argument("--device", default=None,
                   help="pseudo, train --in-process: cpu or cuda (default: cuda if present)")
    p.add_argument("--size", type=int, default=6000,
                   help="predict: side of the square PNG whose peak memory is measured")
    p.add_argument("--max-image-side", type=int, default=None,
                   help="predict: passed to `splitmatch predict` (default: the checkpoint's "
                        "inference.max_image_side)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    # `splitmatch submit ... -- --resume`: what follows a lone -- belongs to the submitted command.
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    args.extra = extra
    if args.verbose:  # read by every process of the command, Ray workers and jobs included
        os.environ["SPLITMATCH_VERBOSE"] = "1"
    if argv_given is None:  # a command, not a caller in this process: SIGTERM is its own to take
        sigterm_as_interrupt()
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:  # what was done is kept; the message says where
        print(str(exc) or "interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130  # 128 + SIGTERM / SIGINT
    # The one place where user-facing failures become one line and an exit code.
    except (UserError, FileNotFoundError, FileExistsError) as exc:
        return _fail(args, exc, 2)
    except RunFailed as exc:
        return _fail(args, exc, 1)


def _fail(args, exc: BaseException, code: int) -> int:
    """Print `exc` as one line, its traceback going to a log file under the runs folder."""
    import time
    import traceback

    storage = "runs"
    if getattr(args, "config", None):
        try:
            storage = load_config(args.config, args.overrides).train.storage_path
        except Exception:  # noqa: BLE001 - the config may be what is broken
            pass
    from splitmatch.storage import local_path
    log = local_path(storage) / "logs" / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(exc)))
        where = f" [traceback: {log}]"
    except OSError:
        where = ""
    kind = "config error" if isinstance(exc, ConfigError) else "error"
    print(f"{kind}: {' '.join(str(exc).split())}{where}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
