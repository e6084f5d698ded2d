"""Training a DINOv2-architecture ViT on labelled shards: the discriminator's feature network when no
pretrained one can be downloaded (the offline demo).

At scale the feature network is `facebook/dinov2-*`. Offline, the demo trains the same architecture
(transformers' `Dinov2Model`) on its own data, supervised with one linear head per label field of the
samples' json (for the digits: the digit, the ink colour, the background colour) on the CLS token, and
saves only the backbone with `save_pretrained`. The trainer then loads it through the same
`from_pretrained` path as the hub model, so the code path is the one used at scale. The preprocessing is
the discriminator's own (ImageNet normalisation at `input_size`), so the features it was trained on are
the features the heads see.

`labelled_images` and `fit_classifier` are shared with the evaluation classifier (eval/classifier.py) and
Diffusion2GAN's perceptual loss, and the demo trains the backbone: a building block of the shared core.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from addpipe.devices import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    pixels: torch.Tensor                 # (N, 3, S, S) in [0, 1]
    labels: dict[str, torch.Tensor]      # field -> (N,) class indices
    classes: dict[str, list[str]]        # field -> class names, sorted

    def __len__(self) -> int:
        return len(self.pixels)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]; bicubic resize of the RGB image."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def labelled_images(shards: str, fields: list[str], size: int, limit: Optional[int] = None) -> LabelledImages:
    """Every sample of `shards` (pattern or directory) with the json `fields` as labels."""
    from addpipe.shards import IMAGE_KEYS
    from addpipe.shards import read_samples
    from addpipe.shards import expand_shards

    pixels, values = [], {field: [] for field in fields}
    for shard in expand_shards(shards):
        for key, files in read_samples(Path(shard)).items():
            extension = next((ext for ext in IMAGE_KEYS if ext in files), None)
            if extension is None or "json" not in files:
                continue
            meta = json.loads(files["json"])
            missing = [field for field in fields if meta.get(field) in (None, "")]
            if missing:
                raise KeyError(f"sample {key} in {shard} has no label field(s) {missing}; its json has {sorted(meta)}")
            with Image.open(io.BytesIO(files[extension])) as image:
                pixels.append(image_tensor(image, size))
            for field in fields:
                values[field].append(str(meta[field]))
            if limit and len(pixels) >= limit:
                break
        if limit and len(pixels) >= limit:
            break
    if not pixels:
        raise ValueError(f"no labelled images in {shards}")
    classes = {field: sorted(set(v)) for field, v in values.items()}
    labels = {field: torch.tensor([classes[field].index(v) for v in values[field]]) for field in fields}
    return LabelledImages(torch.stack(pixels), labels, classes)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random translations (pad 2, crop back): enough to keep a tiny network from memorising."""
    size = pixels.shape[-1]
    padded = F.pad(pixels, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[..., dy:dy + size, dx:dx + size]


def fit_classifier(features: Callable[[torch.Tensor], torch.Tensor], parameters: list[nn.Parameter], feature_dim: int,
                   data: LabelledImages, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                   holdout: float = 0.1, desc: str = "classifier", progress: bool = True) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Train `features` (normalised pixels -> (B, feature_dim)) with one linear head per field.

    -> (heads, held-out accuracy per field). The last `holdout` share of the samples is never trained on.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    held = max(1, int(len(data) * holdout)) if len(data) > 10 else 0
    train_idx, held_idx = order[held:], order[:held]
    heads = nn.ModuleDict({field: nn.Linear(feature_dim, len(names)) for field, names in data.classes.items()})
    optimizer = torch.optim.AdamW(list(parameters) + list(heads.parameters()), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        batch = train_idx[torch.randint(0, len(train_idx), (batch_size,), generator=generator)]
        embedding = features(normalise(augment(data.pixels[batch], generator)))
        loss = sum(F.cross_entropy(heads[field](embedding), data.labels[field][batch]) for field in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    accuracy: dict[str, float] = {}
    if held:
        with torch.no_grad():
            embedding = torch.cat([features(normalise(data.pixels[held_idx[i:i + 256]])) for i in range(0, held, 256)])
            for field, head in heads.items():
                accuracy[field] = float((head(embedding).argmax(1) == data.labels[field][held_idx]).float().mean())
    return heads, accuracy


def train_dinov2(shards: str, out_dir: Path, fields: list[str], image_size: int = 32, steps: int = 1500,
                 hidden: int = 64, layers: int = 4, patch_size: int = 4, lr: float = 1e-3, seed: int = 0,
                 progress: bool = True) -> Path:
    """A DINOv2-architecture ViT trained on `shards`; saved in transformers' format plus addpipe_backbone.json."""
    from transformers import Dinov2Config, Dinov2Model

    data = labelled_images(shards, fields, image_size)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, mlp_ratio=2,
                          patch_size=patch_size, image_size=image_size, layerscale_value=1.0)
    model = Dinov2Model(config).train()
    _, accuracy = fit_classifier(lambda x: model(pixel_values=x).pooler_output, list(model.parameters()), hidden, data,
                                 steps, lr=lr, seed=seed, desc="DINOv2 feature network", progress=progress)
    out_dir = Path(out_dir)
    model.eval().save_pretrained(out_dir)
    (out_dir / "addpipe_backbone.json").write_text(json.dumps({
        "trained_on": shards, "fields": fields, "classes": data.classes, "images": len(data), "steps": steps,
        "holdout_accuracy": accuracy}, indent=2))
    logger.info("DINOv2 feature network: held-out accuracy %s", accuracy)
    return out_dir
