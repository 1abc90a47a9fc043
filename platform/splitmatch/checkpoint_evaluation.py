"""`splitmatch eval`: a finished model's figures on the test split, in-process, at the
calibration training would choose (`calibration.calibrate`); the figures themselves are
`evaluation.ZSSEvaluator`'s."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from splitmatch import storage
from splitmatch.calibration import METRIC_KEYS, calibrate, evaluate, fixed_at
from splitmatch.checkpoints import check_checkpoint_config, load_state
from splitmatch.clip import build_clip
from splitmatch.config import Config, resolve_paths
from splitmatch.data import build_dataset
from splitmatch.engine import build_class_space
from splitmatch.model import build_segmentor
from splitmatch.progress import Progress


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, out_csv: str | Path | None = None,
                        log=print) -> dict:
    """`splitmatch eval`: a finished model on the test split, per-class IoU to CSV. The checkpoint's
    stored config must match `cfg` in all but how it is evaluated (`EVAL_MAY_DIFFER`).

    Returns the test split's {hIoU, sIoU, uIoU, mIoU, per_class}, `seen_score_calibration` (the
    value tested with: under auto chosen on data.select_split as training chooses it) and, with a
    selection split, `select`: its {hIoU, sIoU, uIoU, mIoU} at that value."""
    cfg = resolve_paths(cfg)  # as the stored config is
    if storage.is_remote(checkpoint):  # s3://.../best_model.pt, or a checkpoint_* folder there
        checkpoint = storage.pull(str(checkpoint)) or storage.pull_tree(str(checkpoint))
    state = load_state(checkpoint)
    checked = check_checkpoint_config(checkpoint, state, cfg)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    clip = build_clip(cfg.clip, device=device)
    classes = build_class_space(cfg, clip)
    model = build_segmentor(cfg.model, embed_dim=classes.text.shape[1])
    model.load_state_dict(state["model"])
    model.to(device)
    select_split = cfg.data.select_split
    if select_split is None:
        calibration = calibrate(model, None, None, classes, cfg.inference, device)
    else:  # the same choice as at the end of training, on the weights given
        select_set = build_dataset(cfg.data, select_split, train=False)
        with Progress(len(select_set), f"evaluating {select_split}", "img") as bar:
            calibration = calibrate(model, select_set, select_split, classes, cfg.inference,
                                    device, cfg.eval.batch_size,
                                    progress=lambda done, total: bar.update(done))
    test_set = build_dataset(cfg.data, cfg.data.test_split, train=False)
    with Progress(len(test_set), f"evaluating {cfg.data.test_split}", "img") as bar:
        result = evaluate(model, test_set, classes, fixed_at(cfg.inference, calibration.value),
                          device, cfg.eval.batch_size, progress=lambda done, total: bar.update(done))
    result["seen_score_calibration"] = calibration.value
    if calibration.select is not None:
        result["select"] = {k: calibration.select[k] for k in METRIC_KEYS}
    if out_csv is not None:
        out_csv = Path(out_csv)
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(out_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "split", "IoU"])
            for name, iou in result["per_class"].items():
                writer.writerow([name, "unseen" if name in classes.unseen else "seen",
                                 "" if math.isnan(iou) else f"{iou:.4f}"])
    log(f"{len(test_set)} images of {cfg.data.dataset}/{cfg.data.test_split}: hIoU {result['hIoU']:.2f}  "
        f"sIoU {result['sIoU']:.2f}  uIoU {result['uIoU']:.2f}  mIoU {result['mIoU']:.2f}"
        + (f"; per-class IoU in {out_csv}" if out_csv else "")
        + f"; seen-score calibration {calibration.how} ({checked})")
    return result
