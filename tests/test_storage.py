"""Locations on S3-compatible object storage, against a real S3 server (moto) on loopback: the
mirror primitives, and the toy-CLIP cache and CLIP weights shared through a bucket."""
from pathlib import Path

import torch

from splitmatch import storage
from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig, Config, ToyClipConfig, config_from_dict, to_dict
from splitmatch.toyclip import CHECKPOINT_NAME, checkpoint_key, toy_clip_checkpoint, with_toy_clip
from helpers import RECIPE


def test_files_go_up_and_come_down_whole(tmp_path, s3):
    prefix = f"s3://{s3.bucket}/runs"
    local = tmp_path / "a.txt"
    local.write_text("first")
    storage.push(local, storage.join(prefix, "dir", "a.txt"))
    assert s3.keys("runs/") == ["runs/dir/a.txt"]
    assert storage.info(storage.join(prefix, "dir", "a.txt"))["size"] == 5
    assert storage.info(storage.join(prefix, "dir", "missing")) is None
    assert storage.listdir(prefix) == ["dir"] and storage.listdir(prefix + "/nothing") == []
    assert storage.exists(prefix) and not storage.exists(prefix + "/nothing")
    # The mirror path is this process's own folder (SPLITMATCH_MIRROR), keyed by bucket and key.
    mirror = storage.local_path(storage.join(prefix, "dir", "a.txt"))
    assert mirror == tmp_path / "mirror-driver" / "s3" / s3.bucket / "runs" / "dir" / "a.txt"
    assert storage.pull(storage.join(prefix, "dir", "a.txt")).read_text() == "first"
    assert storage.pull(storage.join(prefix, "dir", "missing")) is None
    # A changed object comes down again when asked to refresh (manifests do).
    local.write_text("second!")
    storage.push(local, storage.join(prefix, "dir", "a.txt"))
    assert storage.pull(storage.join(prefix, "dir", "a.txt"), refresh=True).read_text() == "second!"
    folder = storage.pull_tree(prefix, tmp_path / "copy")
    assert (folder / "dir" / "a.txt").read_text() == "second!"
    assert not list((tmp_path / "copy").rglob(".*"))  # no half downloads left behind
    # Local paths are what they were.
    assert storage.local_path("relative") == Path.cwd() / "relative"
    assert not storage.is_remote(str(tmp_path)) and storage.join(str(tmp_path), "x") == str(tmp_path / "x")


def test_toy_clip_cache_in_a_bucket_is_built_once_and_fetched_elsewhere(tmp_path, s3, monkeypatch):
    cache = f"s3://{s3.bucket}/toy_clip"
    toy = ToyClipConfig(steps=2, batch_size=8, lr=1e-3, seed=0, cache_dir=cache)
    lines: list[str] = []
    built = toy_clip_checkpoint(toy, log=lines.append, recipe=RECIPE)
    key = checkpoint_key(toy, RECIPE)
    assert any("pretraining" in line for line in lines)
    assert s3.keys("toy_clip/") == [f"toy_clip/{key}/toy_clip.json", f"toy_clip/{key}/toy_clip.pt"]
    # Another machine (another mirror folder, nothing local): it is fetched, not trained again.
    monkeypatch.setenv("SPLITMATCH_MIRROR", str(tmp_path / "mirror-other"))
    lines.clear()
    fetched = toy_clip_checkpoint(toy, build=False, log=lines.append, recipe=RECIPE)
    assert fetched != built and str(fetched).startswith(str(tmp_path / "mirror-other"))
    assert fetched.read_bytes() == built.read_bytes()
    assert lines and "using cached checkpoint" in lines[0]


def test_clip_weights_on_s3_load_on_any_node(tmp_path, s3, monkeypatch):
    """`clip.pretrained: s3://...`: each process fetches the file into its mirror; the pseudo-mask
    cache key names the object, not one node's copy of it."""
    from splitmatch.pseudo.cache import cache_key

    tiny = build_clip(ClipConfig(model_name="splitmatch-tiny-vit", pretrained=None))
    weights = {k: v + 0.01 for k, v in tiny.model.state_dict().items()}
    torch.save(weights, tmp_path / "clip.pt")
    uri = f"s3://{s3.bucket}/weights/clip.pt"
    storage.push(tmp_path / "clip.pt", uri)
    cfg = config_from_dict({"clip": {"model_name": "splitmatch-tiny-vit", "pretrained": uri}})
    keys = set()
    for mirror in ("mirror-a", "mirror-b"):
        monkeypatch.setenv("SPLITMATCH_MIRROR", str(tmp_path / mirror))
        clip = build_clip(cfg.clip)
        assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in weights.items())
        keys.add(cache_key(cfg, "train"))
    assert len(keys) == 1
    missing = config_from_dict({"clip": {"model_name": "splitmatch-tiny-vit",
                                         "pretrained": f"s3://{s3.bucket}/weights/none.pt"}})
    try:
        build_clip(missing.clip)
        raise AssertionError("a missing s3:// checkpoint must be refused")
    except Exception as exc:  # noqa: BLE001 - checked below
        assert f"'clip.pretrained': checkpoint file not found: s3://{s3.bucket}/weights/none.pt" in str(exc)


def test_toy_clip_from_a_bucket_resolves_to_its_object(tmp_path, s3):
    """`clip.pretrained: toy` with a remote toy-CLIP cache becomes the object's URI, so that Ray
    workers on other nodes fetch it there rather than look for the driver's local file."""
    cfg = Config()
    data = to_dict(cfg)
    data["clip"]["pretrained"] = "toy"
    data["toy_clip"].update(steps=2, batch_size=8, cache_dir=f"s3://{s3.bucket}/toy")
    cfg = config_from_dict(data)
    # Published through the same path `splitmatch toy-clip` takes (default recipe: a few steps).
    resolved = with_toy_clip(cfg, log=lambda _: None)
    key = checkpoint_key(cfg.toy_clip)
    assert resolved.clip.pretrained == f"s3://{s3.bucket}/toy/{key}/{CHECKPOINT_NAME}"
    assert storage.info(resolved.clip.pretrained) is not None
