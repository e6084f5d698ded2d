"""open_clip image and caption embeddings, L2-normalised, as the CLIP-similarity and aesthetic scores use them."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from addpipe.dataprep.config import EmbedConfig
from addpipe.devices import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class ClipEmbedder:
    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    precision: str

    def _autocast(self):
        if self.device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        with self._autocast():
            features = self.model.encode_image(batch).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    @torch.no_grad()
    def texts(self, captions: list[str]) -> np.ndarray:
        tokens = self.tokenizer(captions).to(self.device)
        with self._autocast():
            features = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def load_clip(config: EmbedConfig) -> ClipEmbedder:
    import open_clip

    if config.model_config:
        if not os.path.isfile(config.model_config):
            raise FileNotFoundError(f"embed.model_config {config.model_config} does not exist")
        open_clip.add_model_config(config.model_config)
    if config.model not in open_clip.list_models():
        raise ValueError(f"embed.model {config.model!r} is not an open_clip model (see open_clip.list_models(), or give embed.model_config)")
    pretrained = os.path.expanduser(config.pretrained) if config.pretrained else None
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))) and not pretrained.startswith("hf-hub:"):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"embed.pretrained {pretrained} does not exist")
    device = resolve_device(config.device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(config.model, pretrained=pretrained, device=device)
    except RuntimeError as error:
        raise RuntimeError(f"could not load open_clip {config.model} with pretrained={pretrained!r}: {error}") from error
    model.eval()
    return ClipEmbedder(model, preprocess, open_clip.get_tokenizer(config.model), device, config.precision)


def embed_config_from_spec(spec: str, device: str = "auto") -> EmbedConfig:
    """`MODEL[@PRETRAINED]`, where MODEL may also be an open_clip model-config .json (custom architectures)."""
    name, _, pretrained = spec.partition("@")
    config_path = None
    if name.endswith(".json"):
        config_path, name = name, os.path.basename(name)[: -len(".json")]
    return EmbedConfig(model=name, pretrained=pretrained, model_config=config_path, device=device)
