"""`splitmatch bench predict`: the peak memory of `splitmatch predict` on one large photo.

A 6000x6000 PNG is written, a checkpoint of the toy preset with random weights (weights do not
change the cost) is saved, and `splitmatch predict` runs on them in a child process whose own
peak RSS is read from the kernel when it exits (`os.wait4`: `getrusage(RUSAGE_CHILDREN)` would
be the largest of every child this process has had).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from splitmatch.demo import DEMO_CONFIG

CLASSES = "cat,dog,sky,grass,tree,road,car,person"  # a user's vocabulary of 8 names


def large_photo(path: Path, side: int) -> None:
    """A toy-world picture scaled up to side x side: smooth regions, as in a photo."""
    from PIL import Image

    from splitmatch.data.toyworld import render

    image, _ = render(seed=0, size=256, n_objects=4)
    Image.fromarray(image).resize((side, side), Image.BILINEAR).save(path)


def toy_checkpoint(path: Path) -> None:
    """The toy preset's model and (randomly initialised) toy CLIP, saved as a run's
    best_model.pt: weights and the config that made them."""
    import torch

    from splitmatch.clip import build_clip
    from splitmatch.config import load_config, to_dict
    from splitmatch.model import build_segmentor

    cfg = load_config(DEMO_CONFIG, ["clip.pretrained=null", "inference.seen_score_calibration=0.0"])
    model = build_segmentor(cfg.model, embed_dim=build_clip(cfg.clip).embed_dim)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)


def peak_rss_gb(command: list[str], log_path: Path) -> tuple[float, float, int]:
    """(peak RSS of `command` in GB, its seconds, its exit code); its output goes to `log_path`."""
    start = time.perf_counter()
    with open(log_path, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return usage.ru_maxrss / 1024 ** 2, time.perf_counter() - start, child.returncode  # KiB


def run(side: int = 6000, max_image_side: int | None = None, log=print) -> dict:
    """Peak RSS of `splitmatch predict` on one side x side PNG; `max_image_side` is passed as
    --max-image-side when given (else the checkpoint's inference.max_image_side holds)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        large_photo(tmp / "photo.png", side)
        toy_checkpoint(tmp / "best_model.pt")
        command = [sys.executable, "-m", "splitmatch.cli", "predict", str(tmp / "best_model.pt"),
                   str(tmp / "photo.png"), "--classes", CLASSES, "--out", str(tmp / "out")]
        if max_image_side is not None:
            command += ["--max-image-side", str(max_image_side)]
        peak, seconds, code = peak_rss_gb(command, tmp / "predict.log")
        output = (tmp / "predict.log").read_text()
        if code != 0:
            raise RuntimeError(f"splitmatch predict failed (exit {code}): {output[-2000:]}")
        from PIL import Image

        with Image.open(tmp / "out" / "photo.png") as label:
            label_size = label.size
    lines = [line for line in output.splitlines() if "max_image_side" in line]
    log(f"predict on one {side}x{side} PNG: peak_rss_gb={peak:.2f} seconds={seconds:.1f} "
        f"label_png={label_size[0]}x{label_size[1]}"
        + (f" --max-image-side {max_image_side}" if max_image_side is not None else ""))
    for line in lines:
        log(f"  predict said: {line}")
    return {"peak_rss_gb": peak, "seconds": seconds, "label_size": label_size}
