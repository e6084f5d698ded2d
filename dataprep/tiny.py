"""Tiny random-init open_clip and aesthetic models for tests, the demo and benchmarks (no downloads).

They go through the same loading code as the real ones: an open_clip model config registered from a
JSON file plus a checkpoint file, and an aesthetic-predictor state dict with the published names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

TINY_CLIP_NAME = "addpipe-tiny-clip"


def quiet_open_clip():
    """open_clip's building steps off the root logger, its WARNING for random weights too (random is the point here)."""
    from addpipe.clip import quiet_root_logger

    return quiet_root_logger(logging.ERROR)


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
    with quiet_open_clip():  # it logs "no pretrained weights ... initialized randomly", which is the point here
        model = open_clip.create_model(TINY_CLIP_NAME)
    weights = directory / f"{TINY_CLIP_NAME}.pt"
    torch.save(model.state_dict(), weights)
    return {"model": TINY_CLIP_NAME, "model_config": str(config_path), "pretrained": str(weights)}


def build_tiny_aesthetic(path: Path, input_size: int = 32, seed: int = 0) -> Path:
    from addpipe.dataprep.aesthetic import AestheticPredictor

    torch.manual_seed(seed)
    torch.save(AestheticPredictor(input_size).state_dict(), path)
    return Path(path)


def train_clip(settings: dict[str, str], images: list, captions: list[str], steps: int = 300, batch_size: int = 128,
               lr: float = 1e-3, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Contrastively train the open_clip model that `settings` (build_tiny_clip's) loads on (PIL image, caption)
    pairs with open_clip's own ClipLoss, and overwrite its checkpoint; -> {"steps", "first_loss", "last_loss"}.

    The demo's random-init CLIP embeds every digit almost identically (median nearest-neighbour cosine 0.9994), so
    its CLIP cut and near-duplicate filter would decide by noise; a few CPU minutes of training on the served images
    make both mean something. Images go through the same preprocessing the embed stage applies."""
    import open_clip
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(f"train_clip needs at least two (image, caption) pairs of equal count, got {len(images)} "
                         f"images and {len(captions)} captions")
    open_clip.add_model_config(settings["model_config"])
    with quiet_open_clip():  # the tokenizer's lookup logs its steps at INFO on the root logger too
        model, _, preprocess = open_clip.create_model_and_transforms(settings["model"], pretrained=settings["pretrained"])
        tokenizer = open_clip.get_tokenizer(settings["model"])
    pixels = torch.stack([preprocess(image) for image in images])
    tokens = tokenizer(list(captions))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loss_fn = ClipLoss()
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="tiny CLIP", disable=not progress):
        pick = torch.randperm(len(pixels), generator=generator)[:batch_size]
        image_features = model.encode_image(pixels[pick], normalize=True)
        text_features = model.encode_text(tokens[pick], normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    torch.save(model.state_dict(), settings["pretrained"])
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}
