"""The paper configs end to end at full size, on a real Ray cluster and a real MLflow store: the
toy world written in the VOC and COCO-Stuff layouts at their image sizes, read by the real
loaders; pseudo masks from a randomly initialised ViT-B/16 through Ray Data; training steps of
the paper's model shapes (ResNet-101, MSDeformAttn with 6 encoder layers, 9 decoder layers,
100 + 50 queries, 512 crops); sliding-window evaluation with 50 random queries. Only the number
of iterations, images and the batch are shrunk (and the weights are random: no downloads)."""
import json
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from splitmatch.data.layouts import export_layout
from splitmatch.tracking import default_tracking_uri
from helpers import finish, splitmatch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CASES = {
    "voc": ("voc_preset.yaml", {"train_aug": 2, "val": 1}, 2),
    "coco_stuff": ("coco_stuff_preset.yaml", {"train2017": 2, "val2017": 1}, 1),
}


@pytest.fixture(scope="module")
def resnet101_file(tmp_path_factory):
    """A local ResNet-101 state dict (random), loaded through model.backbone_weights as the
    ImageNet file would be."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet101.pth"
    torch.save(torchvision.models.resnet101().state_dict(), path)
    return path


@pytest.mark.parametrize("dataset", list(CASES))
@pytest.mark.slow
def test_paper_config_runs_end_to_end_at_full_size(dataset, tmp_path, ray_cluster, resnet101_file):
    config, counts, iterations = CASES[dataset]
    root = export_layout(dataset, tmp_path / dataset, counts)
    train_split, test_split = counts
    overrides = {
        "data.root": root, "clip.pretrained": "null", "model.backbone_weights": resnet101_file,
        "train.max_iters": iterations, "train.batch_size": 1, "train.num_workers": 1,
        "train.cpus_per_worker": 2, "train.use_gpu": "false", "train.amp": "false",
        "train.checkpoint_every": iterations, "train.eval_every": iterations,
        "train.log_every": 1, "train.num_visualizations": 1,
        "train.storage_path": tmp_path / "runs", "pseudo_masks.cache_dir": tmp_path / "cache",
        "pseudo_masks.gpus_per_actor": 0, "pseudo_masks.batch_size": 2,
        "tracking.experiment": "rehearsal"}
    args = [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    out = finish(splitmatch("train", str(EXPERIMENTS / config), "--build-pseudo-masks", *args,
                            address=ray_cluster), timeout=900)
    assert f"test split '{test_split}': hIoU" in out, out[-3000:]

    # Pseudo masks: one record per training image, at the benchmark's image size.
    (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
    records = json.loads(manifest.read_text())
    stats = records["stats"]
    assert stats["images"] == stats["succeeded"] == counts[train_split]
    assert records["complete"] and not records["failures"]
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    experiment = client.get_experiment_by_name("rehearsal").experiment_id
    (run,) = client.search_runs([experiment])
    params, metrics = run.data.params, run.data.metrics
    assert (params["model.backbone"], params["model.enc_layers"], params["model.dec_layers"],
            params["model.num_seen_queries"], params["model.num_candidate_queries"],
            params["data.crop_size"], params["inference.mode"],
            params["inference.num_random_queries"]) == (
        "resnet101", "6", "9", "100", "50", "512", "slide", "50")
    assert metrics["iteration"] == iterations and "hIoU" in metrics and "loss_cos" in metrics
    assert run.info.status == "FINISHED"
