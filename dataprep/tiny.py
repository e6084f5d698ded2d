"""Tiny random-init open_clip and aesthetic models for tests, the demo and benchmarks (no downloads).

They go through the same loading code as the real ones: an open_clip model config registered from a
JSON file plus a checkpoint file, and an aesthetic-predictor state dict with the published names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "addpipe-tiny-clip"


def build_tiny_clip(directory: Path, embed_dim: int = 32, image_size: int = 32, seed: int = 0) -> dict[str, str]:
    """Write `<name>.json` (open_clip model config) and `<name>.pt`; -> the embed.* settings that load them."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps({
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME)
    weights = directory / f"{TINY_CLIP_NAME}.pt"
    torch.save(model.state_dict(), weights)
    return {"model": TINY_CLIP_NAME, "model_config": str(config_path), "pretrained": str(weights)}


def build_tiny_aesthetic(path: Path, input_size: int = 32, seed: int = 0) -> Path:
    from addpipe.dataprep.aesthetic import AestheticPredictor

    torch.manual_seed(seed)
    torch.save(AestheticPredictor(input_size).state_dict(), path)
    return Path(path)
