"""Automated metrics: Fréchet distance in a configurable feature space (Inception = FID, DINOv2 = FD-DINOv2),
CLIP score and latency.

Resizing follows clean-fid's "clean" recipe: each channel resized as a float image with PIL's bicubic
filter (antialiased, no uint8 round trip), so the metric does not depend on which library resized.
Feature networks:
- `inception:PATH`: the standard FID network as a TorchScript file (StyleGAN/clean-fid's
  `inception-2015-12-05.pt`, called with `return_features=True` on 0-255 input), or a torchvision
  `inception_v3` state dict (pool features, ImageNet normalisation);
- `dinov2:ID_OR_DIR`: a transformers DINOv2 (FD-DINOv2 uses ViT-L/14's CLS token at 224 px);
- `clip:MODEL[@PRETRAINED]`: open_clip image embeddings (MODEL may be a model-config .json).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from addpipe.devices import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def clean_resize(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> float32 (size, size, 3) in [0, 255]: per-channel float bicubic resize (clean-fid)."""
    channels = []
    for channel in image.convert("RGB").split():
        resized = Image.fromarray(np.asarray(channel, dtype=np.float32), mode="F").resize((size, size), Image.BICUBIC)
        channels.append(np.asarray(resized, dtype=np.float32))
    return np.clip(np.stack(channels, axis=-1), 0, 255)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    # No `disp=`: SciPy 1.18 removed it, and without it every SciPy returns the root alone. A singular product
    # (fewer samples than dimensions) is expected and handled below, so its warning is not shown.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product (few samples): regularise, as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass
class FeatureNetwork:
    name: str
    size: int
    forward: Callable[[torch.Tensor], torch.Tensor]   # float (N, 3, size, size) in [0, 255] -> (N, D)
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.from_numpy(np.stack([clean_resize(image, self.size) for image in images])).permute(0, 3, 1, 2)
        return self.forward(batch.to(self.device)).float().cpu().numpy()


def _normalised(batch: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch / 255.0 - mean) / std


def load_feature_network(spec: str, device: str | torch.device = "cpu", size: Optional[int] = None) -> FeatureNetwork:
    """`inception:PATH`, `dinov2:ID_OR_DIR` (default facebook/dinov2-large), `clip:MODEL[@PRETRAINED]` or
    `classifier:DIR` (a content classifier trained on the real data, eval/classifier.py)."""
    kind, _, source = spec.partition(":")
    device = torch.device(device)
    if kind == "inception":
        if not source or not os.path.isfile(source):
            raise FileNotFoundError(f"Inception weights {source!r} not found: give inception:/path/to/inception-2015-12-05.pt "
                                    "(TorchScript) or a torchvision inception_v3 state dict")
        try:
            scripted = torch.jit.load(source, map_location=device).eval()
            return FeatureNetwork("inception", size or 299, lambda x: scripted(x, return_features=True), device)
        except RuntimeError:
            from torchvision.models import inception_v3

            model = inception_v3(weights=None, aux_logits=True, init_weights=False)
            model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
            model.fc = torch.nn.Identity()
            model = model.eval().to(device)
            return FeatureNetwork("inception", size or 299, lambda x: model(_normalised(x)), device)
    if kind == "dinov2":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(source or "facebook/dinov2-large").eval().to(device)
        return FeatureNetwork("dinov2", size or 224, lambda x: model(pixel_values=_normalised(x)).last_hidden_state[:, 0], device)
    if kind == "clip":
        from addpipe.clip import embed_config_from_spec, load_clip

        embedder = load_clip(embed_config_from_spec(source, str(device)))
        cfg = embedder.model.visual.preprocess_cfg
        mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        return FeatureNetwork("clip", size or cfg["size"][0], lambda x: embedder.model.encode_image((x / 255.0 - mean) / std), device)
    if kind == "classifier":
        from addpipe.eval.classifier import load_classifier, normalise

        classifier = load_classifier(source, device)
        return FeatureNetwork("classifier", size or classifier.image_size, lambda x: classifier.features(normalise(x / 255.0)), device)
    raise ValueError(f"unknown feature network {spec!r}: use inception:PATH, dinov2:ID_OR_DIR, clip:MODEL[@PRETRAINED] "
                     "or classifier:DIR")


def iter_images(source: str | Path, limit: Optional[int] = None) -> Iterator[Image.Image]:
    """Images from a directory (recursively) or WebDataset shards (a pattern or a directory of .tar)."""
    from addpipe.shards import read_images
    from addpipe.shards import expand_shards

    path = Path(os.path.expanduser(str(source)))
    count = 0
    if path.is_dir() and not list(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        for file in files:
            with Image.open(file) as image:
                yield image.convert("RGB")
            count += 1
            if limit and count >= limit:
                return
        return
    for shard in expand_shards(str(source)):
        for _, data in read_images(Path(shard)).values():
            with Image.open(io.BytesIO(data)) as image:
                yield image.convert("RGB")
            count += 1
            if limit and count >= limit:
                return


def features_of(images: Iterable[Image.Image], network: FeatureNetwork, batch_size: int = 32, desc: str = "features") -> np.ndarray:
    parts, batch = [], []
    for image in tqdm(images, desc=desc, leave=False, disable=None):
        batch.append(image)
        if len(batch) == batch_size:
            parts.append(network(batch))
            batch = []
    if batch:
        parts.append(network(batch))
    if not parts:
        raise ValueError("no images to compute features of")
    return np.concatenate(parts)


def frechet_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def clip_scores(images: list[Image.Image], prompts: list[str], embedder) -> np.ndarray:
    """CLIP score per image: 100 * max(cos(image, prompt), 0) (as torchmetrics defines it)."""
    cosine = np.einsum("nd,nd->n", embedder.images(images), embedder.texts(prompts))
    return 100.0 * np.maximum(cosine, 0.0)
