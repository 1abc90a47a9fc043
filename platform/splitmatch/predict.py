"""A trained model on anyone's images, with any vocabulary: `splitmatch predict` and the MLflow
pyfunc model a finished run logs.

The segmentor classifies query embeddings against CLIP text embeddings, so the classes are a
question asked at prediction time, not something the weights fix. A checkpoint carries the config
that made it, which says which CLIP, model and inference settings to rebuild.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from splitmatch.config import (MIN_IMAGE_SIDE, Config, ConfigError, config_from_dict,
                               stored_config_data)
from splitmatch.progress import Progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
NO_CLASS = 255  # label PNG value of pixels no class wins (never: every pixel gets a class)
RAY_DATA_FROM = 64  # images: from here on a folder is spread over Ray Data actors
# The overlay figure is 6 inches at 90 dpi: matplotlib turns what it draws into float RGBA first,
# so a photo is drawn at no more than twice the figure's pixels, not at its own size.
OVERLAY_SIDE = 1080


def parse_classes(text: str | Sequence[str]) -> list[str]:
    given = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in given]
    if not any(names):
        raise ConfigError("--classes: give at least one class name, e.g. --classes 'cat,dog,sky'")
    if "" in names:  # "a,,b" is a typo, not a request for two classes
        shown = text if isinstance(text, str) else ",".join(given)
        raise ConfigError(f"--classes {shown!r}: entry {names.index('') + 1} of {len(names)} is "
                          f"empty; separate the class names with single commas")
    if len(set(names)) != len(names):
        raise ConfigError(f"--classes: a name is given twice ({', '.join(names)})")
    if len(names) >= NO_CLASS:
        raise ConfigError(f"--classes: at most {NO_CLASS - 1} classes fit a label PNG")
    return names


def scaled_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) scaled so that the longer side is `max_side` (aspect kept), or as given
    when it already fits or there is no limit (None)."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    factor = max_side / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> the same at `size` (height, width): bilinear, whose Pillow
    filter widens when it shrinks, so dropped pixels are averaged in; nearest for class indices."""
    from PIL import Image

    method = Image.NEAREST if nearest else Image.BILINEAR
    return np.array(Image.fromarray(np.ascontiguousarray(array)).resize(size[::-1], method))


class Segmenter:
    """A checkpoint (best_model.pt, a checkpoint_* folder or its state.pt) ready to segment.

    Images larger than `max_image_side` (default: the checkpoint's inference.max_image_side; 0:
    no limit) are segmented scaled down, their labels scaled back up to the image's size."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu",
                 clip_weights: str | None = None, max_image_side: int | None = None):
        from splitmatch.clip import TEMPLATES, build_clip
        from splitmatch.model import build_segmentor
        from splitmatch.splits import class_names, default_unseen
        from splitmatch.checkpoints import CALIBRATION, load_state

        state = load_state(checkpoint)
        if "config" not in state:
            raise ConfigError(f"{checkpoint}: this checkpoint predates stored configs; evaluate "
                              f"it with `splitmatch eval` and its run's config.yaml")
        data = stored_config_data(state["config"], str(checkpoint))
        if clip_weights is not None:  # the pyfunc model carries its own copy of the weights
            data = {**data, "clip": {**data["clip"], "pretrained": clip_weights}}
        self.cfg: Config = config_from_dict(data, str(checkpoint))
        if self.cfg.inference.seen_score_calibration == "auto":
            # Chosen at the end of the run for its result weights, and stored with them.
            if CALIBRATION not in state:
                raise ConfigError(
                    f"{checkpoint}: its run chose the seen-score calibration (auto) for its "
                    f"result weights, and these weights carry no chosen value: predict with the "
                    f"finished run's best_model.pt (or its final checkpoint if it selected none)")
            self.cfg.inference = dataclasses.replace(
                self.cfg.inference, seen_score_calibration=float(state[CALIBRATION]))
        if max_image_side is not None and not (max_image_side == 0 or
                                               max_image_side >= MIN_IMAGE_SIDE):
            raise ConfigError(f"--max-image-side: must be at least {MIN_IMAGE_SIDE} pixels "
                              f"(0: no limit), got {max_image_side}")
        self.max_image_side = (self.cfg.inference.max_image_side if max_image_side is None
                               else max_image_side or None)
        self.device = torch.device(device)
        self.clip = build_clip(self.cfg.clip, device=self.device)
        self.templates = TEMPLATES[self.cfg.clip.templates]
        self.model = build_segmentor(self.cfg.model, embed_dim=self.clip.embed_dim)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        unseen = set(self.cfg.data.unseen or default_unseen(self.cfg.data.dataset))
        # Names the model was trained on get the inductive seen-score calibration, as in `eval`.
        self.trained_on = {n.lower() for n in class_names(self.cfg.data.dataset)} - \
            {n.lower() for n in unseen}

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of (height, width) is segmented at."""
        return scaled_size(height, width, self.max_image_side)

    @torch.no_grad()
    def segment(self, image: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """RGB uint8 [H, W, 3] -> class index per pixel [H, W] (uint8, into `classes`)."""
        text = self.clip.text_embeddings(list(classes), self.templates).float().to(self.device)
        seen = [i for i, name in enumerate(classes) if name.lower() in self.trained_on]
        size = image.shape[:2]
        # The model's score maps are floats per query and per class at the image's own size:
        # for a large photo they, not the weights, fill the memory (docs/performance.md,
        # `predict` on a large image).
        working = self.working_size(*size)
        if working != size:
            image = resize(image, working)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # a writable copy
        label = self.model.predict(pixels.to(self.device), text, self.cfg.inference, seen)[0]
        label = label.to(torch.uint8).cpu().numpy()  # [h, w]
        return label if working == size else resize(label, size, nearest=True)  # [H, W]


def image_paths(inputs: Sequence[str | Path], log=print) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a path that is neither fails,
    and so does a folder without images. What a folder holds besides images is named (`log`)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            entries = sorted(item.iterdir())
            images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            if not images:
                raise FileNotFoundError(f"{item}: no images in this folder (looked for "
                                        f"{', '.join(IMAGE_SUFFIXES)})")
            others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in images]
            if others:
                more = f" and {len(others) - 5} more" if len(others) > 5 else ""
                log(f"{item}: skipped {len(others)} file(s) that are not images "
                    f"({', '.join(IMAGE_SUFFIXES)}): {', '.join(others[:5])}{more}")
            paths += images
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    if not paths:
        raise FileNotFoundError("no image or folder given")
    return paths


def write_outputs(image: np.ndarray, label: np.ndarray, classes: Sequence[str], out_dir: Path,
                  stem: str) -> tuple[Path, Path]:
    """`<stem>.png`: the class index per pixel (a label PNG); `<stem>_overlay.png`: the image
    with each class in its colour and a legend of the classes present."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from PIL import Image

    from splitmatch.visualize import class_colors

    out_dir.mkdir(parents=True, exist_ok=True)
    label_path = out_dir / f"{stem}.png"
    Image.fromarray(label).save(label_path)
    colors = class_colors(len(classes))
    fig = Figure(figsize=(6, 6 * image.shape[0] / image.shape[1] + 0.8), layout="constrained")
    ax = fig.subplots()
    present = [int(c) for c in np.unique(label)]  # at full size: a small class keeps its legend
    shown = scaled_size(*label.shape, OVERLAY_SIDE)
    if shown != label.shape:
        image, label = resize(image, shown), resize(label, shown, nearest=True)
    ax.imshow(image)
    ax.imshow(colors[label], alpha=0.55)
    ax.set_xticks([]), ax.set_yticks([])
    fig.legend(handles=[Patch(color=colors[c], label=classes[c]) for c in present],
               loc="outside lower center", ncol=min(4, len(present)), frameon=False)
    overlay_path = out_dir / f"{stem}_overlay.png"
    fig.savefig(overlay_path, dpi=90)
    return label_path, overlay_path


class _PredictActor:
    """Ray Data callable class: one Segmenter per actor, outputs written by the actor."""

    def __init__(self, checkpoint: str, classes: list[str], out_dir: str,
                 max_image_side: int | None):
        self.segmenter = Segmenter(checkpoint, max_image_side=max_image_side)
        self.classes, self.out_dir = classes, Path(out_dir)

    def __call__(self, batch: dict) -> dict:
        from splitmatch.data.dataset import read_image

        scaled = []
        for path in batch["path"]:
            image = read_image(path)
            write_outputs(image, self.segmenter.segment(image, self.classes), self.classes,
                          self.out_dir, Path(path).stem)
            scaled.append(_scaling(Path(path), image.shape[:2], self.segmenter))
        return {"path": batch["path"], "scaled": scaled}


def _scaling(path: Path, size: tuple[int, int], segmenter: Segmenter) -> str:
    """"photo.png 6000x6000 -> 2048x2048" for an image segmented scaled down, else ""."""
    working = segmenter.working_size(*size)
    if working == size:
        return ""
    return f"{path.name} {size[1]}x{size[0]} -> {working[1]}x{working[0]}"


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], classes: Sequence[str],
            out_dir: str | Path, use_ray: bool | None = None, log=print,
            max_image_side: int | None = None) -> list[Path]:
    """`splitmatch predict`: segment every image of `inputs` into `out_dir`; returns the label
    PNGs. Folders of RAY_DATA_FROM images or more (or `use_ray`) go through Ray Data actors.
    `max_image_side`: as Segmenter's (None: the checkpoint's inference.max_image_side)."""
    from splitmatch.data.dataset import read_image

    classes = parse_classes(classes)
    paths = image_paths(inputs, log)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ConfigError("two input images share a file name: their outputs would overwrite "
                          "each other; predict them into separate --out folders")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "classes.json").write_text(json.dumps(classes))  # label value i = classes[i]
    if use_ray or (use_ray is None and len(paths) >= RAY_DATA_FROM):
        import ray

        from splitmatch.cluster import init_ray

        init_ray()
        workers = max(1, min(int(ray.cluster_resources().get("CPU", 1)), 8))
        log(f"predicting {len(paths)} images on {workers} Ray Data actor(s)")
        ds = ray.data.from_items([{"path": str(p)} for p in paths]).map_batches(
            _PredictActor, batch_size=8, num_cpus=1,
            fn_constructor_kwargs={"checkpoint": str(checkpoint), "classes": classes,
                                   "out_dir": str(out_dir), "max_image_side": max_image_side},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers))
        scaled = []
        with Progress(len(paths), "predicting", "img") as bar:
            for batch in ds.iter_batches(batch_size=None):
                bar.update(bar.done + len(batch["path"]))
                scaled += [str(s) for s in batch["scaled"] if s]
        assert bar.done == len(paths)
    else:
        segmenter = Segmenter(checkpoint, max_image_side=max_image_side)
        scaled = []
        with Progress(len(paths), "predicting", "img") as bar:
            for path in paths:
                image = read_image(path)
                write_outputs(image, segmenter.segment(image, classes), classes, out_dir, path.stem)
                scaled.append(_scaling(path, image.shape[:2], segmenter))
                bar.update()
        scaled = [s for s in scaled if s]
    log(f"{len(paths)} image(s) segmented into {', '.join(classes)}: label PNGs and overlays in "
        f"{out_dir} (label value i = class i of {out_dir / 'classes.json'})")
    if scaled:
        more = f" and {len(scaled) - 5} more" if len(scaled) > 5 else ""
        log(f"{len(scaled)} image(s) larger than inference.max_image_side were segmented scaled "
            f"down, their label maps scaled back to full size (--max-image-side N changes the "
            f"limit, 0 lifts it): {', '.join(sorted(scaled)[:5])}{more}")
    return [out_dir / f"{stem}.png" for stem in stems]
