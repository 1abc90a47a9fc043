"""The shared dataset base: decoding, label mapping, inductive relabelling, errors, batching.

Every dataset (VOC, COCO-Stuff, the toy world) yields the same sample dict:
`{"image": uint8 [3, H, W] RGB, "label": int64 [H, W] class ids or ignore, "index": int,
"path": str}`.
Images stay uint8: models normalise them themselves, so one sample serves every backbone.

Inductive zero-shot segmentation (docs/method.md, "Setting") forbids the training loop from ever seeing
an unseen-class pixel, so in train mode unseen ids are turned into ignore by the same lookup table
that maps raw file values to class ids, i.e. right after decoding and before any transform runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from splitmatch.data.transforms import TrainAugment
from splitmatch.errors import UserError

Sample = dict[str, Any]


class DataError(UserError, ValueError):
    """A bad sample or missing dataset file; the message names the file and the problem."""


# ----------------------------------------------------------------------------- decoding


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image to RGB uint8 [H, W, 3], turning every decoder failure into a DataError."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # PIL decodes lazily: force it here so truncated files fail inside the try
            return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy, for torch
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc


def read_label(path: str | Path) -> np.ndarray:
    """Decode a label PNG to its raw pixel values [H, W] (palette indices for mode-P files)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            raw = np.asarray(img)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: label file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode label ({exc})") from exc
    if mode not in ("P", "L", "I", "I;16"):
        raise DataError(f"{path}: label must be a single-channel PNG (mode P or L), "
                        f"got mode {mode}")
    if raw.dtype != np.uint8:
        # 16-bit label files exist in the wild; values beyond 255 can never be valid ids here.
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = np.unique(raw[(raw < 0) | (raw > 255)])[:10].tolist()
            raise DataError(f"{path}: label values out of range: {bad}")
        raw = raw.astype(np.uint8)
    return raw


def read_list_file(path: str | Path) -> list[str]:
    """Sample ids of a split list file: one id per line, blank lines skipped.

    Some VOC-aug distributions write `"/JPEGImages/x.jpg /SegmentationClassAug/x.png"` lines; the
    stem of the first token is the id in that case.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: split list file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read split list file ({exc.strerror or exc})") from exc
    ids = []
    for line in text.splitlines():
        tokens = line.split()
        if tokens:
            ids.append(Path(tokens[0]).stem if len(tokens) > 1 else tokens[0])
    return ids


def item_seed(base_seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch, index), so augmentation never shares RNG state."""
    # SeedSequence only takes non-negative entropy.
    entropy = [v & 0xFFFF_FFFF_FFFF_FFFF for v in (base_seed, epoch, index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- the base dataset


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of all datasets: subclasses only say how to read sample `index` and its raw label.

    `raw_to_class` maps each legal raw label value to a class id (or to `ignore_index`); any other
    raw value is out of range and raises. In `on_error="skip"` mode a bad sample comes back as None
    and its error is kept in `last_error` / `errors` (this process only: DataLoader workers keep
    their own), and `__getitems__` hands `collate` a record naming the file instead of the None.
    """

    def __init__(self, class_names: Sequence[str], unseen_ids: Sequence[int],
                 raw_to_class: dict[int, int], *, train: bool,
                 augment: TrainAugment | None = None, ignore_index: int = 255,
                 on_error: Literal["raise", "skip"] = "raise", seed: int = 0) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.class_names = tuple(class_names)
        self.unseen_ids = sorted(unseen_ids)
        self.seen_ids = sorted(set(range(len(self.class_names))) - set(self.unseen_ids))
        self.ignore_index = ignore_index
        self.train = train
        self.augment = augment
        self.on_error = on_error
        self.seed = seed
        self.epoch = 0
        self.last_error: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []
        # Unseen-candidate pseudo masks (a `PseudoMaskCache`): when set, samples also carry
        # "candidate_map" [H, W] uint8 and "candidate_embeds" [U, C], augmented with the label.
        self.candidates = None
        # -1 marks raw values that are out of range; a 256-entry table covers every uint8 value.
        lut = np.full(256, -1, dtype=np.int16)
        for raw, cls in raw_to_class.items():
            lut[raw] = cls
        self._valid_raw = lut >= 0
        if train:  # inductive ZSS: unseen pixels turn to ignore in the decoding table itself
            lut[np.isin(lut, self.unseen_ids)] = ignore_index
        self._lut = lut.astype(np.int64)

    # Subclasses implement __len__, read and path_of.
    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        """Return (RGB uint8 [H, W, 3], raw label [H, W] uint8, image path, label path)."""
        raise NotImplementedError

    def path_of(self, index: int) -> str:
        """The image path of sample `index` (what error records and samples report)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw; DataLoader workers see it only if they are re-created."""
        self.epoch = epoch

    def map_label(self, raw: np.ndarray, label_path: str) -> np.ndarray:
        """Raw file values -> class ids (unseen -> ignore in train mode); unknown values raise."""
        bad = ~self._valid_raw[raw]
        if bad.any():
            values = np.unique(raw[bad])[:10].tolist()
            raise DataError(f"{label_path}: label values out of range: {values} "
                            f"({len(self.class_names)} classes)")
        return self._lut[raw]

    def load(self, index: int) -> Sample:
        """The sample at `index`, raising DataError whatever `on_error` says."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        image, raw, image_path, label_path = self.read(index)
        if image.shape[:2] != raw.shape:
            raise DataError(f"{image_path}: image size {image.shape[1]}x{image.shape[0]} differs "
                            f"from label {label_path} size {raw.shape[1]}x{raw.shape[0]}")
        label = torch.from_numpy(self.map_label(raw, label_path))  # [H, W] int64
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W]
        extra: dict[str, Any] = {}
        if self.candidates is not None:
            try:
                candidate_map, extra["candidate_embeds"] = self.candidates.get(index)
            except KeyError as exc:
                raise DataError(f"{image_path}: {exc.args[0]}") from exc
            if candidate_map.shape != label.shape:
                raise DataError(f"{image_path}: cached pseudo masks are {tuple(candidate_map.shape)}, "
                                f"label is {tuple(label.shape)}: the cache belongs to other data")
            # Pack candidate ids above the 8 label bits, so crops, flips and nearest-neighbour
            # rescaling move both maps together; padding with ignore (255) means "no candidate".
            label = label | (candidate_map.long() << 8)
        if self.augment is not None:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
            image_t, label = self.augment(image_t, label, generator)
        if self.candidates is not None:
            extra["candidate_map"] = (label >> 8).to(torch.uint8).contiguous()
            label = label & 0xFF
        return {"image": image_t.contiguous(), "label": label.contiguous(), "index": index,
                "path": image_path, **extra}

    def __getitem__(self, index: int) -> Sample | None:
        try:
            return self.load(index)
        except DataError as exc:
            if self.on_error == "raise":
                raise
            self.last_error = {"index": index, "path": self.path_of(index), "error": str(exc)}
            self.errors.append(self.last_error)
            return None

    def __getitems__(self, indices: Sequence[int]) -> list[Sample]:
        """Batch fetch used by DataLoader: skipped samples become `{"skipped": True, ...}`."""
        out = []
        for index in indices:
            sample = self[index]
            out.append(sample if sample is not None else {"skipped": True, **self.last_error})
        return out


# ----------------------------------------------------------------------------- batching


def collate(samples: Sequence[Sample | None]) -> dict[str, Any]:
    """Stack a batch, leaving out skipped samples and listing them under `skipped`.

    A skipped sample is either None (plain `dataset[i]`) or the record `__getitems__` produces;
    only the latter can name its file. An all-skipped batch gives empty tensors.
    """
    kept: list[Sample] = []
    skipped: list[dict[str, Any]] = []
    for sample in samples:
        if sample is None:
            skipped.append({"path": None, "error": "sample skipped (see dataset.last_error)"})
        elif sample.get("skipped"):
            skipped.append({"path": sample["path"], "error": sample["error"]})
        else:
            kept.append(sample)
    if kept:
        images = torch.stack([s["image"] for s in kept])  # [B, 3, H, W]
        labels = torch.stack([s["label"] for s in kept])  # [B, H, W]
    else:
        images = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        labels = torch.empty(0, 0, 0, dtype=torch.int64)
    batch = {"image": images, "label": labels, "index": [s["index"] for s in kept],
             "path": [s["path"] for s in kept], "skipped": skipped}
    if kept and "candidate_map" in kept[0]:
        batch["candidate_map"] = torch.stack([s["candidate_map"] for s in kept])  # [B, H, W]
        batch["candidate_embeds"] = [s["candidate_embeds"] for s in kept]  # B × [U_b, C]
    return batch
