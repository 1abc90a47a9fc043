"""`splitmatch` command line: one thin subcommand per capability over library calls."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitmatch.config import ConfigError, dump_config, load_config



def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see experiments/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.num_candidate_queries=20 "
                             "(repeatable; values are parsed as YAML)")


def cmd_config(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_train(args) -> int:
    from splitmatch.train import open_pseudo_masks, train_local
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path(cfg.train.storage_path) / cfg.name).resolve()
    try:
        candidates = open_pseudo_masks(cfg, args.build_pseudo_masks, args.config)
    except FileNotFoundError as exc:
        print(f"error: {exc} (or pass --build-pseudo-masks)", file=sys.stderr)
        return 2
    train_local(cfg, run_dir, candidates=candidates)
    return 0


def cmd_pseudo(args) -> int:
    from splitmatch.pseudo.pipeline import run_pseudo
    manifest = run_pseudo(load_config(args.config, args.overrides), split=args.split)
    return 0 if manifest["complete"] else 1


def cmd_bench(args) -> int:
    if args.what == "matching":
        from splitmatch.bench.matching import run
        run(repeats=args.repeats)
    elif args.what == "pseudo":
        from splitmatch.bench.pseudo import run
        run(num_images=args.images, clip_name=args.clip, repeats=args.repeats, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitmatch", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Split Matching for inductive zero-shot semantic segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + --set)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train and evaluate a segmentor (single process)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.add_argument("--run-dir", default=None,
                   help="where config, checkpoint and metrics go (default: train.storage_path/name)")
    p.add_argument("--build-pseudo-masks", action="store_true",
                   help="build the pseudo-mask cache first if it is missing (splitmatch pseudo)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pseudo", help="build the CLIP pseudo-mask cache on Ray Data (resumable)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.add_argument("--split", default=None, help="dataset split (default: data.train_split)")
    p.set_defaults(func=cmd_pseudo)

    p = sub.add_parser("bench", help="print benchmark figures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["matching", "pseudo"], help="which benchmark")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is kept)")
    p.add_argument("--images", type=int, default=8, help="pseudo: toy images in the batch")
    p.add_argument("--clip", default="ViT-B-16",
                   help="pseudo: open_clip model (random init) or 'tiny' for the test CLIP")
    p.add_argument("--device", default=None, help="pseudo: cpu or cuda (default: cuda if present)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
