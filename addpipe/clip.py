"""open_clip image and caption embeddings, L2-normalised, as the CLIP-similarity and aesthetic scores use them.

Shared by curation (`addpipe prep`'s embed step, whose `embed:` section is `EmbedConfig`) and evaluation
(`addpipe eval metrics` / `analyse`, which name a model with `embed_config_from_spec`). torch, open_clip and the
device helpers are imported when a model is loaded, so the config trees that name `EmbedConfig` stay light.

Batch-invariant: a sample's embedding must not depend on which samples share its forward pass, or a requeued or
rerun array task (other batch boundaries, another embed.batch_size, another thread count) would write other bits
than the first run (issue 31: one clip_similarity differed in its 7th digit). CPU kernels pick their blocking by
the matrix shape: a ViT's rows for 1 image and for 4 differ in the last bit. So the model always runs on
`forward_rows` samples at a time, the last chunk padded with copies of its last sample: every forward has the same
shape and each row is computed alone. On the CPU that is a fixed 8 rows whatever embed.batch_size says (as fast
as larger batches there); on a GPU it is embed.batch_size (the same setting and device give the same bits).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from addpipe.assets import ASSET_OPEN_CLIP

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)
CPU_FORWARD_ROWS = 8
"""Samples per forward pass on the CPU, a constant so that scores do not depend on embed.batch_size there."""


@dataclass
class EmbedConfig:
    model: str = "ViT-L-14"
    """open_clip model name. The LAION aesthetic predictor expects ViT-L-14 image embeddings (768-d)."""
    pretrained: str = field(default="openai", metadata=ASSET_OPEN_CLIP)
    """open_clip pretrained tag, hf-hub:org/name, or a local checkpoint file."""
    model_config: Optional[str] = None
    """An open_clip model-config JSON to register first (for architectures open_clip does not ship)."""
    batch_size: int = 64
    """Images (and captions) per forward pass on a GPU. On the CPU every forward takes exactly 8 (the last chunk of a
    shard padded), so scores do not depend on batch boundaries, resume points or threads (addpipe/clip.py); there
    this is only how many images are decoded per call."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision on GPU; embeddings are always stored as float32."""


@dataclass
class ClipEmbedder:
    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    precision: str
    forward_rows: int = CPU_FORWARD_ROWS
    """Every forward pass sees exactly this many samples (the last chunk padded)."""

    def _autocast(self):
        import torch

        if self.device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def _fixed_shape(self, encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> np.ndarray:
        """`encode` over `inputs` in chunks of exactly forward_rows rows; -> L2-normalised float32 rows."""
        import torch

        rows = self.forward_rows
        parts = []
        for start in range(0, len(inputs), rows):
            chunk = inputs[start : start + rows]
            real = len(chunk)
            if real < rows:  # pad with copies of the last sample: the same shape as every other forward
                chunk = torch.cat([chunk, chunk[-1:].expand(rows - real, *chunk.shape[1:])])
            with self._autocast():
                features = encode(chunk.to(self.device)).float()
            parts.append(torch.nn.functional.normalize(features, dim=-1)[:real].cpu())
        return torch.cat(parts).numpy()

    def images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._fixed_shape(self.model.encode_image, torch.stack([self.preprocess(image) for image in images]))

    def texts(self, captions: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._fixed_shape(self.model.encode_text, self.tokenizer(captions))


def load_clip(config: EmbedConfig) -> ClipEmbedder:
    import open_clip

    from addpipe.devices import resolve_device

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
        with quiet_root_logger():
            model, _, preprocess = open_clip.create_model_and_transforms(config.model, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(config.model)
    except RuntimeError as error:
        raise RuntimeError(f"could not load open_clip {config.model} with pretrained={pretrained!r}: {error}") from error
    model.eval()
    rows = CPU_FORWARD_ROWS if device.type == "cpu" else config.batch_size
    return ClipEmbedder(model, preprocess, tokenizer, device, config.precision, rows)


@contextlib.contextmanager
def quiet_root_logger(at_least: int = logging.WARNING):
    """open_clip reports each step of building a model with `logging.info` on the root logger ("INFO root: Loaded
    ViT-L-14 model config.", "Loading pretrained ... weights"): noise in every prep log. Inside, the root logger
    passes only records of `at_least` (its warnings by default)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, at_least))
    try:
        yield
    finally:
        root.setLevel(level)


def embed_config_from_spec(spec: str, device: str = "auto") -> EmbedConfig:
    """`MODEL[@PRETRAINED]`, where MODEL may also be an open_clip model-config .json (custom architectures)."""
    name, _, pretrained = spec.partition("@")
    config_path = None
    if name.endswith(".json"):
        config_path, name = name, os.path.basename(name)[: -len(".json")]
    return EmbedConfig(model=name, pretrained=pretrained, model_config=config_path, device=device)
