"""The ADD discriminator: a frozen DINOv2 ViT and trainable 1-D convolutional heads on its tokens.

StyleGAN-T's design (docs/method.md): a head per selected transformer layer, each a 1x1 conv block and a
residual block with a wide kernel over the token sequence, normalised by a "local" batch norm over
small virtual groups (without normalisation the heads did not learn), ending in projection
conditioning: per-token features are projected and dotted with an affine map of the condition
(pooled text embedding and DINOv2 CLS embedding of the real image).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.utils.parametrize  # noqa: F401 - nn.utils.parametrize
import torch.nn.functional as F

from addpipe.devices import IMAGENET_MEAN, IMAGENET_STD



def evenly_spaced_layers(num_layers: int, num_heads: int) -> list[int]:
    """1-based layer indices spread over the network, always including the last layer."""
    if num_heads > num_layers:
        raise ValueError(f"{num_heads} heads requested but the feature network has only {num_layers} layers")
    return sorted({round(num_layers * (i + 1) / num_heads) for i in range(num_heads)})


class LocalBatchNorm(nn.Module):
    """Batch norm over virtual groups of at most `virtual_batch_size` samples (StyleGAN-T's BatchNormLocal):
    statistics stay comparable whatever the per-rank batch, and no running state is kept."""

    def __init__(self, channels: int, virtual_batch_size: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def group_count(self, batch: int) -> int:
        groups = math.ceil(batch / self.virtual_batch_size)
        while batch % groups:
            groups += 1
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        groups = self.group_count(batch)
        grouped = x.float().view(groups, batch // groups, channels, length)
        mean = grouped.mean(dim=(1, 3), keepdim=True)
        var = grouped.var(dim=(1, 3), keepdim=True, unbiased=False)
        normed = ((grouped - mean) * torch.rsqrt(var + self.eps)).view(batch, channels, length).to(x.dtype)
        return normed * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


class SpectralNorm(nn.Module):
    """A weight parametrisation W -> W / sigma(W), sigma the largest singular value of W as a (out, rest) matrix,
    from a power iteration started afresh at every call from a fixed vector (no gradient through the iteration;
    sigma = u^T W v carries it, as torch's spectral_norm does). Stateless on purpose: torch's spectral_norm keeps
    its vectors u, v as buffers that advance one step per training forward, which a checkpoint of the trained
    parameters does not hold, so a resumed run would differ from the uninterrupted one, and a measuring forward
    would change training. 30 steps put sigma within 0.5% on a 384 x 3456 Gaussian matrix (DINOv2-S's width, kernel
    9), for about 20 ms on a CPU core."""

    def __init__(self, iterations: int = 30):
        super().__init__()
        self.iterations = iterations

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.flatten(1)
        with torch.no_grad():
            v = torch.full((matrix.shape[1],), matrix.shape[1] ** -0.5, dtype=matrix.dtype, device=matrix.device)
            for _ in range(self.iterations):
                u = F.normalize(matrix @ v, dim=0, eps=1e-12)
                v = F.normalize(matrix.t() @ u, dim=0, eps=1e-12)
        sigma = torch.dot(u, matrix @ v)
        return weight / sigma


def normalised(layer: nn.Module, spectral: bool) -> nn.Module:
    """`layer` with spectral normalisation of its weight (StyleGAN-T's SpectralConv1d): its largest singular value
    held at 1, which bounds how sharply a head can react to its features, the same job R1 does from the other side."""
    if spectral:
        nn.utils.parametrize.register_parametrization(layer, "weight", SpectralNorm())
    return layer


class ConvBlock(nn.Sequential):
    def __init__(self, channels: int, kernel_size: int, virtual_batch_size: int, spectral: bool = False):
        super().__init__(
            normalised(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular"),
                       spectral),
            LocalBatchNorm(channels, virtual_batch_size),
            nn.LeakyReLU(0.2),
        )


class DiscriminatorHead(nn.Module):
    """Tokens (B, C, N) and a condition (B, D) -> per-token logits (B, N)."""

    def __init__(self, channels: int, condition_dim: int, projection_dim: int, kernel_size: int, virtual_batch_size: int,
                 spectral_norm: bool = False):
        super().__init__()
        self.stem = ConvBlock(channels, 1, virtual_batch_size, spectral_norm)
        self.residual = ConvBlock(channels, kernel_size, virtual_batch_size, spectral_norm)
        self.condition_dim = condition_dim
        if condition_dim > 0:
            self.to_logits = normalised(nn.Conv1d(channels, projection_dim, 1), spectral_norm)
            self.project_condition = nn.Linear(condition_dim, projection_dim)  # StyleGAN-T's cmapper: no SN
        else:
            self.to_logits = normalised(nn.Conv1d(channels, 1, 1), spectral_norm)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        hidden = self.stem(tokens)
        hidden = (hidden + self.residual(hidden)) / math.sqrt(2.0)
        out = self.to_logits(hidden)
        if self.condition_dim == 0:
            return out.squeeze(1)
        condition_map = self.project_condition(condition).unsqueeze(-1)
        return (out * condition_map).sum(dim=1) / math.sqrt(out.shape[1])


class Discriminator(nn.Module):
    """Frozen feature network + heads. Call `features()` on images, then the module on those features.

    The split lets the trainer take R1 with respect to exactly the tensors each head consumed and
    keeps the trainable part (the heads) the only thing a DeepSpeed engine has to optimise.
    """

    def __init__(
        self,
        feature_network: nn.Module,
        layers: Sequence[int],
        text_dim: int,
        image_dim: int,
        projection_dim: int = 64,
        kernel_size: int = 9,
        virtual_batch_size: int = 8,
        text_conditioning: bool = True,
        image_conditioning: bool = True,
        input_size: int = 224,
        image_encoder: nn.Module | None = None,
        spectral_norm: bool = False,
    ):
        super().__init__()
        self.feature_network = feature_network
        # A separate image encoder is kept outside the module tree when it is the same network.
        self.separate_image_encoder = image_encoder is not None and image_encoder is not feature_network
        if self.separate_image_encoder:
            self.image_encoder = image_encoder
        self.layers = list(layers)
        self.text_conditioning = text_conditioning
        self.image_conditioning = image_conditioning
        self.input_size = input_size
        channels = feature_network.config.hidden_size
        condition_dim = (text_dim if text_conditioning else 0) + (image_dim if image_conditioning else 0)
        self.heads = nn.ModuleList(
            DiscriminatorHead(channels, condition_dim, projection_dim, kernel_size, virtual_batch_size, spectral_norm)
            for _ in self.layers
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _freeze(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.feature_network] + ([self.image_encoder] if self.separate_image_encoder else [])

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # the backbone never leaves eval mode (no dropout, no stat updates)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB -> ImageNet-normalised input at the feature network's size."""
        images = (images.float() + 1.0) / 2.0
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        dtype = next(self.feature_network.parameters()).dtype
        return ((images - self.mean) / self.std).to(dtype)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of the selected layers as (B, C, N); differentiable w.r.t. the images."""
        output = self.feature_network(pixel_values=self.preprocess(images), output_hidden_states=True)
        return [output.hidden_states[layer].transpose(1, 2).float() for layer in self.layers]

    @torch.no_grad()
    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """c_img: the DINOv2 CLS embedding of the (real) images."""
        encoder = self.image_encoder if self.separate_image_encoder else self.feature_network
        return encoder(pixel_values=self.preprocess(images)).pooler_output.float()

    def condition(self, text_embedding: torch.Tensor | None, image_embedding: torch.Tensor | None) -> torch.Tensor | None:
        parts = []
        if self.text_conditioning:
            parts.append(text_embedding)
        if self.image_conditioning:
            parts.append(image_embedding)
        return torch.cat([p.float() for p in parts], dim=1) if parts else None

    def forward(
        self, features: Sequence[torch.Tensor], text_embedding: torch.Tensor | None, image_embedding: torch.Tensor | None
    ) -> list[torch.Tensor]:
        condition = self.condition(text_embedding, image_embedding)
        return [head(tokens, condition) for head, tokens in zip(self.heads, features)]


def build_discriminator(config, text_dim: int, dtype: torch.dtype = torch.float32) -> Discriminator:
    """The discriminator a DiscriminatorConfig describes, its DINOv2 loaded with transformers."""
    from transformers import Dinov2Model

    from addpipe.train.models import load_pretrained

    feature_network = load_pretrained(Dinov2Model, config.feature_network, torch_dtype=dtype)
    image_encoder = None
    if config.image_encoder and config.image_encoder != config.feature_network:
        image_encoder = load_pretrained(Dinov2Model, config.image_encoder, torch_dtype=dtype)
    num_layers = feature_network.config.num_hidden_layers
    layers = list(config.layers) or evenly_spaced_layers(num_layers, config.num_heads)
    if any(not 1 <= layer <= num_layers for layer in layers):
        raise ValueError(f"discriminator.layers {layers} must lie in 1..{num_layers}")
    image_dim = (image_encoder or feature_network).config.hidden_size
    return Discriminator(
        feature_network, layers, text_dim=text_dim, image_dim=image_dim,
        projection_dim=config.projection_dim, kernel_size=config.kernel_size,
        virtual_batch_size=config.virtual_batch_size, text_conditioning=config.text_conditioning,
        image_conditioning=config.image_conditioning, input_size=config.input_size, image_encoder=image_encoder,
        spectral_norm=config.spectral_norm,
    )
