"""The sections of an experiment's configuration: one typed dataclass per section, each field with
its default. These defaults are the only ones: constructors elsewhere take their values from
here through a `build_*` function."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from splitmatch.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem: the message names the key and the source file."""


@dataclass
class MFEConfig:
    enabled: bool = True
    norm: Literal["gn", "bn", "none"] = "gn"
    num_groups: int = 32


@dataclass
class ModelConfig:
    backbone: Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    # "imagenet": torchvision's ImageNet weights for this depth (torch hub cache, downloaded once);
    # or the path of a local torchvision state dict; None trains the backbone from scratch.
    backbone_weights: str | None = None
    pixel_decoder: Literal["msdeform", "fpn"] = "msdeform"
    hidden_dim: int = 256
    mask_dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 9
    # Mask2Former's 100 queries become the seen queries; candidate queries are added on top.
    num_seen_queries: int = 100
    num_candidate_queries: int = 50
    # The class embedding of a candidate in training (paper Table 3): the CLIP CLS token Cu of
    # its masked region ("cls"), the model's own MFE features Fu averaged over the candidate mask
    # ("dense"), or those through a learned MLP ("dense_mlp"). The dense ones need the MFE.
    candidate_embedding: Literal["cls", "dense", "dense_mlp"] = "cls"
    # Classify in a centred space (not in the paper): the text embeddings less the mean of the
    # seen classes' texts, the candidates' Cu less the mean of the training candidates' Cu, each
    # L2-normalised again. CLIP's text embeddings share one large common component and its
    # image embeddings another (the modality gap), so uncentred, a query's cosines to the class
    # texts differ by a few hundredths and one "hub" text wins (docs/method.md).
    center_embeddings: bool = False
    mfe: MFEConfig = field(default_factory=MFEConfig)


@dataclass
class ToyWorldConfig:
    num_train: int = 512
    num_val: int = 128    # the model-selection split ("val")
    num_test: int = 128   # the reported split ("test")
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 4
    seed: int = 0


@dataclass
class DataConfig:
    dataset: Literal["voc", "coco_stuff", "toyworld"] = "toyworld"
    root: str = "data"
    train_split: str = "train"
    # The split that is reported: evaluated once, on the finished model. Benchmarks call it "val"
    # (VOC, COCO-Stuff), but it is the protocol's test set, so nothing is selected on it.
    test_split: str = "val"
    # The split model selection looks at (periodic evaluation, best checkpoint, Tune); None: no
    # selection, the final checkpoint is the result.
    select_split: str | None = None
    # Names of unseen classes; None = the standard split of the dataset (splits.py).
    unseen: list[str] | None = None
    crop_size: int = 512
    min_scale: float = 0.5
    max_scale: float = 2.0
    ignore_index: int = 255
    # "raise": a bad sample (missing/corrupt file, label out of range, size mismatch) stops with an
    # error naming the file; "skip": it is left out and counted.
    on_error: Literal["raise", "skip"] = "raise"
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig)


@dataclass
class ClipConfig:
    model_name: str = "ViT-B-16"
    # An open_clip pretrained tag ("openai") or a local checkpoint path; None = random init.
    pretrained: str | None = "openai"
    # Folder of extra open_clip model-config JSONs (the tiny test CLIP, the toy CLIP).
    model_config_dir: str | None = None
    # "single": "a photo of a {}." (VOC habit); "coco15": the 15 COCO-Stuff templates.
    templates: Literal["single", "coco15"] = "single"
    force_quick_gelu: bool = False
    # The weights file's sha256, checked when it is loaded: a run or cache made with other
    # weights under the same path (a file replaced, or the toy CLIP built on another kind of CPU,
    # which gives other weights under the same key) then differs in this key and is not reused.
    # Set for the toy CLIP when it is resolved; None leaves a file unchecked.
    sha256: str | None = None


@dataclass
class ToyClipConfig:
    """The project's own small CLIP, pretrained on toy-world images + captions (`splitmatch toy-clip`)."""

    model_name: str = "splitmatch-toy-vit"
    seed: int = 0
    # 800 steps of 64: held-out zero-shot accuracy clears the 0.90 the toy world needs, with a
    # margin, in minutes on a CPU (the measurements are in docs/).
    steps: int = 800
    batch_size: int = 64
    lr: float = 1.0e-3
    image_size: int = 64
    cache_dir: str = "runs/toy_clip"


@dataclass
class PseudoMaskConfig:
    # Window sizes S of Eq. 1, in CLIP patch units. On the 14×14 grid of ViT-B/16 at 224 px,
    # 5, 7 and 9 give 25, 9 and 4 seeds: fine, medium and coarse partitions to fuse.
    scales: list[int] = field(default_factory=lambda: [5, 7, 9])
    merge_threshold: float = 0.85
    min_area: int = 64
    # What min_area applies to: a whole fused cluster, or each of its connected regions.
    min_area_per: Literal["cluster", "region"] = "cluster"
    # What CLIP sees of a candidate for its CLS embedding Cu: the image with everything outside
    # the region blacked out, the region's (square) bounding box, or that box blacked out. The
    # last names the hidden unseen object best on the toy world (docs/method.md).
    cls_input: Literal["masked", "crop", "masked_crop"] = "masked_crop"
    kmeans_iters: int = 30
    kmeans_tol: float = 1e-4
    # Not in the paper: candidates whose Cu is nearer these prompts' mean text embedding than to
    # every seen class text are left out of training (the cache keeps them). Empty: all are kept.
    # Three quarters of the toy world's candidates are background (docs/method.md).
    background_prompts: list[str] = field(default_factory=list)
    # CLIP input side for the dense features; None = the model's own (224 → 14×14 for ViT-B/16).
    image_size: int | None = None
    cache_dir: str = "runs/pseudo_cache"
    # Ray Data: images per kernel call, actors in the pool, resources per actor. GPUs are used
    # only when the cluster has them.
    batch_size: int = 8
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0
    # With data.on_error: skip, the largest share of images that may fail before `pseudo` says the
    # cache is not complete (exit 1) instead of training on what is left.
    max_failed_fraction: float = 0.01


@dataclass
class MatchingConfig:
    # "split": Split Matching; "baseline": plain Mask2Former matching on seen targets only.
    mode: Literal["split", "baseline"] = "split"
    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0


@dataclass
class LossConfig:
    class_weight: float = 2.0
    iou_weight: float = 5.0
    dice_weight: float = 5.0
    cos_weight: float = 1.0
    mfe_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True
    # Negatives of the candidate queries' focal loss: every column of E = [As, Cu] ("all", the
    # paper's Su = sigmoid(Vu·Eᵀ)) or the candidate columns Cu only ("candidates"; measured
    # better on every toy split, see docs/method.md).
    candidate_negatives: Literal["all", "candidates"] = "candidates"
    # "joint": every loss divided by all targets of the batch (Mask2Former); "per_group": with Split
    # Matching, the seen and the candidate queries' losses each by their own targets' count.
    normalization: Literal["joint", "per_group"] = "joint"
    # The candidate columns each image's queries are scored against: its own candidates ("image",
    # the paper's E_b = [As, Cu_b]) or every candidate of the worker's batch ("batch": the other
    # images' Cu as more negatives, except those within candidate_pool_max_cosine of one of the
    # image's own, likely the same kind of object; docs/method.md).
    candidate_pool: Literal["image", "batch"] = "image"
    # The CLIP cosine above which two candidates' Cu count as the same kind of object: the batch
    # pool leaves those out of an image's negatives, the batch cosine balance counts them.
    candidate_pool_max_cosine: float = 0.5
    # L_cos over the matched candidates: their plain mean ("none", the paper's) or "batch": each
    # weighted by 1 / (the batch's matched candidates of its kind, by candidate_pool_max_cosine),
    # so a rare kind of object pulls its query's embedding as much as a frequent one
    # (docs/method.md). CLIP embeddings only, no label.
    cosine_balance: Literal["none", "batch"] = "none"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    schedule: Literal["poly", "cosine"] = "poly"
    poly_power: float = 0.9
    warmup_iters: int = 0
    grad_clip: float = 0.01


@dataclass
class TrainConfig:
    max_iters: int = 20000
    # The global batch, split evenly over the Ray Train workers (paper: 16 over 8 GPUs).
    batch_size: int = 16
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    amp: bool = True
    checkpoint_every: int = 2000
    eval_every: int = 2000
    log_every: int = 20
    loader_workers: int = 2
    # Ray Train restarts the worker group from the latest checkpoint up to this many times.
    max_failures: int = 3
    # Validation images drawn (image, ground truth, prediction, candidate queries) at each eval.
    num_visualizations: int = 3
    # Weight averaging (averaging.py): > 0 keeps an exponential moving average of the weights
    # with this decay, and the selection split chooses among averaged weights, which become the
    # result (best_model.pt); 0: off, the last step's weights are evaluated (the paper).
    ema_decay: float = 0.0
    storage_path: str = "runs"


@dataclass
class InferenceConfig:
    # Extra randomly initialised queries added at test time (paper: 50 + 50).
    num_random_queries: int = 0
    # ZegCLIP's inductive calibration: subtracted from seen-class scores at test time. "auto":
    # the value of `calibration_grid` with the best hIoU on data.select_split, chosen per run
    # (calibration.py); a number fixes it (0: off).
    seen_score_calibration: float | Literal["auto"] = 0.0
    calibration_grid: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2])
    # With model.center_embeddings: the centre the test vocabulary's texts are classified
    # against. "seen": the seen texts' mean kept from training; "vocabulary": the mean of the
    # texts given at test time (all of them, unseen ones included: they are the test's input,
    # no label), so a test vocabulary's own common direction, which favours one unseen class
    # (a hub), is taken out as training took out the seen texts'.
    text_center: Literal["seen", "vocabulary"] = "seen"
    # "whole": one forward pass per image. "slide": ZegCLIP / OTSeg's protocol (the paper's
    # comparison rows): crop_size windows every `stride` pixels, the scores of overlaps averaged.
    mode: Literal["whole", "slide"] = "whole"
    crop_size: int = 512
    stride: int = 426
    # Resize each test image so its short side has this length first (ZegCLIP: 512); the
    # prediction is scored at the label's size. None: native size.
    short_side: int | None = None
    # `splitmatch predict` and the pyfunc model only (eval scores at full size): a photo whose
    # longer side exceeds this is segmented scaled down to it and its label map scaled back up
    # (nearest), because the score maps grow with the pixels (the peaks measured by
    # `splitmatch bench predict` are in docs/performance.md). None: no limit.
    max_image_side: int | None = 1536


@dataclass
class EvalConfig:
    batch_size: int = 1


@dataclass
class TrackingConfig:
    # None = a local SQLite store under the run directory; else an MLflow server URI.
    uri: str | None = None
    experiment: str = "splitmatch"


@dataclass
class StorageConfig:
    # The S3-compatible endpoint of `s3://` locations (train.storage_path, the cache dirs,
    # clip.pretrained); None = the AWS_ENDPOINT_URL of the environment, else AWS itself.
    s3_endpoint_url: str | None = None


@dataclass
class TuneConfig:
    """`splitmatch tune`: the search space and how to explore it.

    `space` maps flattened config keys to one distribution each: {"grid": [...]} (every value),
    {"choice": [...]}, {"uniform": [lo, hi]}, {"loguniform": [lo, hi]} or {"randint": [lo, hi]}.
    """

    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1  # random: trials drawn; grid: repeats of the whole grid
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = 100  # ASHA: iterations before a trial can be stopped
    reduction_factor: int = 2
    max_concurrent_trials: int = 1
    space: dict = field(default_factory=dict)


@dataclass
class Config:
    name: str = "splitmatch"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    toy_clip: ToyClipConfig = field(default_factory=ToyClipConfig)
    pseudo_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
