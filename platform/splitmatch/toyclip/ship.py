"""Ship a toy-CLIP build with the package: `python -m splitmatch.toyclip.ship CACHE_DIR/KEY` writes
`toyclip/shipped/KEY/` (the compact weights and the build's record) from a cache folder, after
checking that the compact weights give the build's outputs on every toy caption word.

Not imported by the package: it is run once per rebuild of the toy config's toy CLIP
(`splitmatch toy-clip experiments/toyworld.yaml --pretrain`), then the old key's folder is
removed and tests/toy_clip_golden.py records the new weights' outputs.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from splitmatch.clip import build_clip
from splitmatch.config import ClipConfig
from splitmatch.files import file_sha256, temporary_name, write_atomic
from splitmatch.toyclip.captions import caption_words
from splitmatch.toyclip.checkpoint import CHECKPOINT_NAME, INFO_NAME, SHIPPED
from splitmatch.toyclip.compact import (COMPACT_NAME, compact_state_dict, expand_state_dict,
                                        toy_vocabulary)


def ship_checkpoint(folder: Path, shipped: Path = SHIPPED) -> Path:
    """Write `shipped/KEY/` for the cache folder `folder` (`.../KEY/`); returns it."""
    folder = Path(folder)
    info = json.loads((folder / INFO_NAME).read_text())
    if info["key"] != folder.name:
        raise ValueError(f"{folder}: its {INFO_NAME} names key {info['key']}")
    model_name = info["inputs"]["toy_clip"]["model_name"]
    full = build_clip(ClipConfig(model_name=model_name, pretrained=str(folder / CHECKPOINT_NAME)))
    state = torch.load(folder / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    compact = compact_state_dict(state, toy_vocabulary(full.tokenizer))

    # Refuse to ship weights that are not the build's on the toy words: the same rows must
    # give the same embeddings to the last bit.
    expanded = build_clip(ClipConfig(model_name=model_name, pretrained=None))
    expanded.model.load_state_dict(expand_state_dict(compact), strict=True)
    words = caption_words()
    if not torch.equal(expanded.prompt_embeddings(words), full.prompt_embeddings(words)):
        raise AssertionError(f"{folder}: the compact weights change the toy captions' embeddings")

    target = shipped / info["key"]
    staging = temporary_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_atomic(staging / COMPACT_NAME, lambda handle: torch.save(compact, handle))
        info["shipped"] = {"token_rows": int(compact["token_rows"].numel()),
                           "built_sha256": file_sha256(folder / CHECKPOINT_NAME)}
        (staging / INFO_NAME).write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m splitmatch.toyclip.ship CACHE_DIR/KEY")
    target = ship_checkpoint(Path(argv[0]))
    size = sum(path.stat().st_size for path in target.iterdir())
    print(f"shipped {target} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
