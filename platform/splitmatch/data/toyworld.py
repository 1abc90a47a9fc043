"""The toy world: procedurally drawn images of ten object classes on varied backgrounds.

It stands in for VOC when there is no data or GPU: small, fast, deterministic, and with the same
sample format. Each class differs from every other in colour, texture and shape (so a small CLIP
trained on toy captions can tell them apart, and K-means on its features has something to find):

    tomato        red disc, shaded, green calyx and stem on top
    lemon         yellow ellipse with pointed tips and a fine pore texture
    leaf          green lens (pointed ends) with a stem, a light midrib and side veins
    brick         orange-brown rectangle with grey mortar lines in a running-bond pattern
    checkerboard  red/white checkered square
    starfish      orange five-pointed star with pale dots
    zebra         irregular ellipse blob with wavy black/white stripes
    donut         ring with a light dough rim, chocolate icing and coloured sprinkles
    grape         inverted-triangle cluster of shaded purple discs with a stem
    ice cube      light cyan rounded square with an inner bevel and a white highlight

Backgrounds are muted gradients plus low-frequency noise plus one faint texture, different in every
image, so "not background" cannot be learned from colour alone. Background pixels are ignore (255),
as VOC's background is in the ZSS protocol.

Everything is drawn with vectorised numpy on coordinate grids, each object only inside its own
bounding box, so generation costs a few milliseconds per 128 x 128 image.

On-disk layout written by `export_toyworld(cfg, root, split)` (read later by the Ray Data pipeline):
    {root}/{split}/images/{index:06d}.png   RGB
    {root}/{split}/labels/{index:06d}.png   8-bit grey: class ids 0..9, 255 background; all
                                            classes kept (training readers mask unseen ones)
    {root}/{split}/list.txt                 one id ("000000") per line, in index order
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
from PIL import Image

from splitmatch import splits
from splitmatch.config import DataConfig, ToyWorldConfig
from splitmatch.data.dataset import DataError, SegmentationDataset
from splitmatch.data.transforms import TrainAugment


BACKGROUND = 255
NUM_CLASSES = len(splits.TOYWORLD_CLASSES)
# Object half-extent as a fraction of the image side: diameters of 26%..50% of the side keep every
# object well above the ~12% minimum and let 2-4 objects cover a fair share of the image.
MIN_RADIUS, MAX_RADIUS = 0.13, 0.25
# Classes with an "up" (stem on top) only get a small tilt; the rest rotate freely.
UPRIGHT = {"tomato", "grape"}

Drawing = tuple[np.ndarray, np.ndarray]  # (mask [h, w] bool, colour [h, w, 3] float32)


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array([r, g, b], dtype=np.float32)


def _mix(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Per-pixel blend c0 -> c1 by t in [0, 1]: [h, w] -> [h, w, 3]."""
    return c0 + t[..., None].astype(np.float32) * (c1 - c0)


def _hash(i: np.ndarray, j: np.ndarray, salt: float) -> np.ndarray:
    """Cheap deterministic pseudo-random value in [0, 1) per integer cell (i, j)."""
    x = np.sin(i * 12.9898 + j * 78.233 + salt) * 43758.5453
    return x - np.floor(x)


# ----------------------------------------------------------------------------- the ten classes
# Each drawer gets object-frame coordinates u (along the object's axis) and v (across, pointing
# "down" before rotation), scaled so the object spans roughly [-1, 1], and returns (mask, colour).


def _tomato(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    body = u * u + (v * 1.08) ** 2 <= 1.0
    light = np.clip(((u + 0.35) ** 2 + (v + 0.35) ** 2) / 1.7, 0.0, 1.0)
    color = _mix(light, _rgb(240, 70, 55), _rgb(150, 20, 20))
    calyx = (u / 0.42) ** 2 + ((v + 0.86) / 0.15) ** 2 <= 1.0
    stem = (np.abs(u) < 0.07) & (v > -1.12) & (v < -0.8)
    top = calyx | stem
    color[top] = _rgb(45, 125, 40)
    return body | top, color


def _lemon(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    body = u * u + (v / 0.66) ** 2 <= 1.0
    tips = ((np.abs(u) - 0.93) / 0.17) ** 2 + (v / 0.13) ** 2 <= 1.0
    light = np.clip(((u + 0.3) ** 2 + (v + 0.3) ** 2) / 1.5, 0.0, 1.0)
    color = _mix(light, _rgb(255, 235, 90), _rgb(215, 175, 20))
    color *= (1.0 + 0.05 * np.sin(u * 37.0) * np.sin(v * 41.0))[..., None]
    return body | tips, color


def _leaf(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    # Intersection of two discs (radius 1.25, centres at v = +-0.75): a lens with tips at u = +-1.
    blade = (u * u + (v - 0.75) ** 2 <= 1.5625) & (u * u + (v + 0.75) ** 2 <= 1.5625)
    stem = (u > 0.9) & (u < 1.28) & (np.abs(v) < 0.045)
    color = _mix(np.clip(np.abs(v) / 0.5, 0.0, 1.0), _rgb(85, 170, 65), _rgb(30, 100, 30))
    side = (u + 1.1 * np.abs(v)) * 3.5
    veins = blade & (u < 0.95) & ((np.abs(v) < 0.035) | (np.abs(side - np.round(side)) < 0.08))
    color[veins | stem] = _rgb(165, 210, 120)
    return blade | stem, color


def _brick(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    body = (np.abs(u) <= 1.0) & (np.abs(v) <= 0.62)
    rows = (v + 0.62) / 0.31
    row = np.floor(rows)
    cols = (u + 1.0) / 0.5 + 0.5 * (row % 2)  # running bond: odd rows shift half a brick
    col = np.floor(cols)
    mortar = (rows - row < 0.14) | (cols - col < 0.08)
    tone = (_hash(row, col, 1.7) - 0.5) * 30.0  # bricks differ a little from each other
    color = _rgb(170, 78, 40) + tone[..., None].astype(np.float32) * _rgb(1.0, 0.6, 0.4)
    color[mortar] = _rgb(205, 200, 188)
    return body, color


def _checkerboard(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    body = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    cell = 1.7 / rng.integers(4, 8)
    parity = (np.floor((u + 0.85) / cell) + np.floor((v + 0.85) / cell)) % 2
    color = _mix(parity, _rgb(235, 235, 228), _rgb(200, 28, 40))
    return body, color


def _starfish(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    reach = 0.42 + 0.58 * ((1.0 + np.cos(5.0 * phi)) / 2.0) ** 1.6
    body = rho <= reach
    color = _mix(np.clip(rho / reach, 0.0, 1.0), _rgb(225, 95, 25), _rgb(250, 140, 50))
    gu, gv = u * 5.5, v * 5.5
    dots = (gu - np.round(gu)) ** 2 + (gv - np.round(gv)) ** 2 < 0.06
    color[dots] = _rgb(255, 220, 165)
    return body, color


def _zebra(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    phase = rng.uniform(0.0, 2.0 * np.pi, 3)
    phi = np.arctan2(v, u)
    wobble = 0.9 + 0.07 * np.sin(3.0 * phi + phase[0]) + 0.05 * np.sin(5.0 * phi + phase[1])
    body = np.sqrt(u * u + (v / 0.75) ** 2) <= wobble
    stripes = np.sin(u * rng.uniform(9.0, 13.0) + 1.2 * np.sin(v * 2.5 + phase[2])) > 0.0
    color = _mix(stripes, _rgb(240, 240, 232), _rgb(18, 18, 18))
    return body, color


_SPRINKLE_COLORS = np.array([[250, 120, 180], [255, 255, 255], [80, 150, 240], [250, 220, 60],
                              [120, 220, 120]], dtype=np.float32)


def _donut(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    rho = np.sqrt(u * u + (v / 0.9) ** 2)
    phi = np.arctan2(v, u)
    ring = (rho >= 0.42) & (rho <= 1.0)
    icing = (rho >= 0.5) & (rho <= 0.86 + 0.05 * np.sin(7.0 * phi))
    color = _mix(np.clip(np.abs(rho - 0.71) / 0.29, 0.0, 1.0), _rgb(225, 170, 100),
                  _rgb(185, 125, 60))
    color[icing] = _rgb(100, 52, 28)
    # Sprinkles: one short dash per 0.2-wide cell, orientation/presence/colour hashed from the cell.
    salt = rng.uniform(0.0, 100.0)
    gu, gv = u / 0.2, v / 0.2
    ci, cj = np.floor(gu), np.floor(gv)
    angle = _hash(ci, cj, salt) * np.pi
    fu, fv = gu - ci - 0.5, gv - cj - 0.5
    along = fu * np.cos(angle) + fv * np.sin(angle)
    across = fv * np.cos(angle) - fu * np.sin(angle)
    present = _hash(ci, cj, salt + 3.1) < 0.7
    sprinkle = icing & present & (np.abs(along) < 0.32) & (np.abs(across) < 0.1)
    which = (_hash(ci, cj, salt + 7.3) * len(_SPRINKLE_COLORS)).astype(np.int64)
    color[sprinkle] = _SPRINKLE_COLORS[which[sprinkle]]
    return ring, color


def _grape(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    # Nearest point of a hexagonal lattice (two interleaved rectangular lattices), one grape each.
    spacing = 0.42
    row = spacing * np.sqrt(3.0) / 2.0
    au, av = np.round(u / spacing) * spacing, np.round(v / (2 * row)) * 2 * row
    bu = np.round((u - spacing / 2) / spacing) * spacing + spacing / 2
    bv = np.round((v - row) / (2 * row)) * 2 * row + row
    use_a = (u - au) ** 2 + (v - av) ** 2 <= (u - bu) ** 2 + (v - bv) ** 2
    cu, cv = np.where(use_a, au, bu), np.where(use_a, av, bv)
    dist = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) / (0.5 * spacing)
    # Keep grapes whose centre lies in an inverted triangle: wide at the top, one at the bottom.
    cluster = (cv >= -0.75) & (cv <= 0.8) & (np.abs(cu) <= 0.7 * (0.85 - cv) / 1.6 + 0.05)
    berries = cluster & (dist <= 0.97)
    stem = (np.abs(u) < 0.05) & (v > -1.05) & (v < -0.7)
    color = _mix(np.clip(dist, 0.0, 1.0), _rgb(140, 70, 165), _rgb(70, 25, 90))
    hx, hy = (u - cu) / (0.5 * spacing) + 0.35, (v - cv) / (0.5 * spacing) + 0.35
    color[berries & (hx * hx + hy * hy < 0.09)] = _rgb(200, 160, 215)
    color[stem] = _rgb(90, 110, 40)
    return berries | stem, color


def _ice_cube(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> Drawing:
    # Signed distance to a square of half-side 0.7, rounded by 0.22.
    qx, qy = np.abs(u) - 0.7, np.abs(v) - 0.7
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    sdf = outside + np.minimum(np.maximum(qx, qy), 0.0) - 0.22
    body = sdf <= 0.0
    color = _mix(np.clip((u + v + 1.8) / 3.6, 0.0, 1.0), _rgb(200, 240, 250), _rgb(140, 205, 230))
    color[body & (sdf > -0.1)] = _rgb(215, 245, 252)  # bevelled rim
    highlight = (np.abs(u + v + 0.75) < 0.12) & (np.abs(u - v) < 0.55)
    color[highlight | ((u + 0.15) ** 2 + (v + 0.55) ** 2 < 0.01)] = _rgb(252, 253, 255)
    return body, color


DRAWERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], Drawing]] = {
    "tomato": _tomato, "lemon": _lemon, "leaf": _leaf, "brick": _brick,
    "checkerboard": _checkerboard, "starfish": _starfish, "zebra": _zebra, "donut": _donut,
    "grape": _grape, "ice cube": _ice_cube,
}
assert tuple(DRAWERS) == splits.TOYWORLD_CLASSES  # drawer order = label id order


# ----------------------------------------------------------------------------- background


@lru_cache(maxsize=8)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """[size, grid] linear-interpolation weights: M @ G @ M.T upsamples a grid x grid field."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), grid - 2)
    frac = (pos - lo).astype(np.float32)
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), lo] = 1.0 - frac
    weights[np.arange(size), lo + 1] = frac
    return weights


@lru_cache(maxsize=8)
def _pixel_coords(size: int) -> np.ndarray:
    return np.arange(size, dtype=np.float32) + 0.5


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient + low-frequency colour noise + one faint texture: [size, size, 3] float32."""
    xs = _pixel_coords(size)
    y, x = xs[:, None], xs[None, :]
    gray = rng.uniform(70.0, 190.0, (2, 1))
    ends = (gray + rng.normal(0.0, 18.0, (2, 3))).astype(np.float32)  # low saturation: muted
    angle = rng.uniform(0.0, 2.0 * np.pi)
    t = (x * np.cos(angle) + y * np.sin(angle)) / size
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = _mix(t, ends[0], ends[1])
    grid = int(rng.integers(3, 7))
    weights = _upsample_matrix(size, grid)
    field = rng.normal(0.0, rng.uniform(6.0, 18.0), (grid, grid, 3)).astype(np.float32)
    image += np.einsum("yi,ijc,xj->yxc", weights, field, weights, optimize=True)
    texture = rng.integers(0, 4)
    amplitude = rng.uniform(4.0, 10.0)
    if texture == 0:  # faint parallel stripes
        beta, freq = rng.uniform(0.0, np.pi), rng.uniform(6.0, 20.0)
        pattern = np.sin(2 * np.pi * freq * (x * np.cos(beta) + y * np.sin(beta)) / size)
    elif texture == 1:  # faint weave
        freq = rng.uniform(0.3, 0.8)
        pattern = np.sin(x * freq) * np.sin(y * freq)
    elif texture == 2:  # ripples around a random centre
        cy, cx = rng.uniform(0.0, size, 2)
        pattern = np.sin(np.sqrt((y - cy) ** 2 + (x - cx) ** 2) * rng.uniform(0.2, 0.6))
    else:  # grain
        pattern = rng.standard_normal((size, size), dtype=np.float32) * 0.6
    image += (amplitude * pattern)[..., None].astype(np.float32)
    return image


# ----------------------------------------------------------------------------- composing


def _draw_object(image: np.ndarray, label: np.ndarray, class_id: int, radius: float,
                 rng: np.random.Generator) -> None:
    """Paint one object of `class_id` on top of `image` / `label` (in place)."""
    size = label.shape[0]
    name = splits.TOYWORLD_CLASSES[class_id]
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
    tilt = rng.uniform(-0.35, 0.35) if name in UPRIGHT else rng.uniform(0.0, 2.0 * np.pi)
    stretch_u, stretch_v = np.exp(rng.normal(0.0, 0.08, 2))
    # Drawers stay within |u|, |v| <= 1.3; the box below contains that after rotation and stretch.
    reach = 1.3 * radius * max(stretch_u, stretch_v) * np.sqrt(2.0)
    y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    coords = _pixel_coords(size)
    dy, dx = coords[y0:y1, None] - cy, coords[None, x0:x1] - cx
    cos, sin = np.float32(np.cos(tilt)), np.float32(np.sin(tilt))
    u = (cos * dx + sin * dy) / (radius * stretch_u)  # [h, w]
    v = (cos * dy - sin * dx) / (radius * stretch_v)
    mask, color = DRAWERS[name](u, v, rng)
    color = color * rng.uniform(0.88, 1.12) + rng.normal(0.0, 8.0, 3).astype(np.float32)
    np.copyto(image[y0:y1, x0:x1], color, where=mask[..., None])
    label[y0:y1, x0:x1][mask] = class_id


def _render(rng: np.random.Generator, size: int, n_objects: int,
            classes: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    if classes is None:
        # Distinct classes per image while possible: more classes per image, fewer merged regions.
        classes = rng.choice(NUM_CLASSES, size=n_objects, replace=n_objects > NUM_CLASSES)
    elif len(classes) != n_objects:
        raise ValueError(f"classes has {len(classes)} entries for {n_objects} objects")
    bad = [c for c in classes if not 0 <= c < NUM_CLASSES]
    if bad:
        raise ValueError(f"class ids {bad} are not toy-world classes (0..{NUM_CLASSES - 1})")
    image = _background(rng, size)
    label = np.full((size, size), BACKGROUND, dtype=np.uint8)
    radii = rng.uniform(MIN_RADIUS, MAX_RADIUS, n_objects) * size
    # Largest first, so smaller objects drawn later are not hidden behind big ones.
    for k in np.argsort(-radii, kind="stable"):
        _draw_object(image, label, int(classes[k]), float(radii[k]), rng)
    return np.clip(image, 0.0, 255.0).astype(np.uint8), label


def render(seed: int, size: int, n_objects: int, classes: Sequence[int] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """One toy image from `seed`: (RGB uint8 [size, size, 3], label uint8 [size, size]).

    `classes` gives the class id of each object (length `n_objects`); None draws them at random.
    Labels hold class ids 0..9 for visible object pixels and 255 for background.
    """
    return _render(np.random.default_rng(seed), size, n_objects, classes)


def sample_seed(base_seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of image `index` of `split`; crc32 because Python's str hash changes per process."""
    return np.random.SeedSequence([base_seed & 0xFFFF_FFFF, zlib.crc32(split.encode()), index])


def generate(cfg: ToyWorldConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `split`: a pure function of (cfg.seed, split, index) and the sizes."""
    rng = np.random.default_rng(sample_seed(cfg.seed, split, index))
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    return _render(rng, cfg.image_size, n_objects, None)


def split_size(cfg: ToyWorldConfig, split: str) -> int:
    if split == "train":
        return cfg.num_train
    if split == "val":
        return cfg.num_val
    if split == "test":
        return cfg.num_test
    raise DataError(f"toyworld has splits 'train', 'val' and 'test', not {split!r}")


# ----------------------------------------------------------------------------- dataset and export


class ToyWorld(SegmentationDataset):
    """The toy world's split `split`, generated on the fly (no files)."""

    def __init__(self, cfg: ToyWorldConfig, split: str, unseen_ids: Sequence[int], *, train: bool,
                 augment: TrainAugment | None = None, ignore_index: int = 255,
                 on_error: Literal["raise", "skip"] = "raise", seed: int = 0) -> None:
        raw_to_class = {k: k for k in range(NUM_CLASSES)}
        raw_to_class[BACKGROUND] = ignore_index
        super().__init__(splits.TOYWORLD_CLASSES, unseen_ids, raw_to_class, train=train,
                         augment=augment, ignore_index=ignore_index, on_error=on_error, seed=seed)
        self.cfg = cfg
        self.split = split
        self.length = split_size(cfg, split)
        # Rendering is a visible share of a CPU training step and a split is small (256 toy
        # images are 16 MB): each image is drawn once per process and kept.
        self._rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def path_of(self, index: int) -> str:
        return f"toyworld/{self.split}/{index:06d}"

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        if index not in self._rendered:
            self._rendered[index] = generate(self.cfg, self.split, index)
        image, label = self._rendered[index]
        path = self.path_of(index)
        return image, label, path, path


def export_toyworld(cfg: DataConfig, root: str | Path, split: str) -> Path:
    """Write `split` to `{root}/{split}/` (layout in the module docstring); return that folder."""
    count = split_size(cfg.toyworld, split)
    out = Path(root) / split
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    ids = [f"{index:06d}" for index in range(count)]
    for index, name in enumerate(ids):
        image, label = generate(cfg.toyworld, split, index)
        Image.fromarray(image).save(out / "images" / f"{name}.png")
        Image.fromarray(label).save(out / "labels" / f"{name}.png")
    (out / "list.txt").write_text("".join(f"{name}\n" for name in ids))
    return out
