"""Differentiable augmentation of the discriminator's images (DiffAugment, Zhao et al. 2020; StyleGAN-T trains its
heads with it): colour, translation and cutout applied to real and generated images alike before the frozen
feature network, so the heads cannot memorise the few real images they see and the student's gradient flows
through the same transform.

Each sample's parameters are drawn from a generator seeded with (seed, step, data stream, purpose), like the
training noise: a resumed run and any rank layout draw the same augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from addpipe.train.methods.add.config import AUGMENT_POLICIES as POLICIES
from addpipe.train.schedule import step_generator, stream_groups

TRANSLATION = 0.125
"""Largest shift, as a share of the image side (DiffAugment's default)."""
CUTOUT = 0.5
"""Side of the zeroed square, as a share of the image side (DiffAugment's default)."""


def parse_policy(text: str) -> tuple[str, ...]:
    """'color,translation,cutout' -> the policies, refused by name if unknown; '' -> none."""
    found = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in found if part not in POLICIES]
    if unknown:
        raise ValueError(f"discriminator.augment: unknown {', '.join(unknown)}; choose from {', '.join(POLICIES)} "
                         "(comma-separated), or '' for none")
    return found


@dataclass
class AugmentParameters:
    """Per-sample draws, each in [0, 1): brightness, saturation, contrast, shift x, shift y, cutout x, cutout y."""

    values: torch.Tensor  # (batch, 7)


def draw(seed: int, step: int, streams: list[int], purpose: int) -> AugmentParameters:
    parts = [torch.rand((end - start, 7), generator=step_generator(seed, step, stream, purpose))
             for start, end, stream in stream_groups(streams)]
    return AugmentParameters(torch.cat(parts))


def augment(images: torch.Tensor, policies: tuple[str, ...], parameters: AugmentParameters) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> augmented, differentiable w.r.t. the images."""
    if not policies:
        return images
    r = parameters.values.to(images.device, images.dtype)
    view = (-1, 1, 1, 1)
    x = images
    if "color" in policies:  # DiffAugment's ranges: brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]
        x = x + (r[:, 0] - 0.5).view(view)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (2 * r[:, 1]).view(view) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (r[:, 2] + 0.5).view(view) + mean
    height, width = x.shape[-2:]
    if "translation" in policies:  # an integer shift with zero padding, per sample
        pad_h, pad_w = max(1, int(height * TRANSLATION + 0.5)), max(1, int(width * TRANSLATION + 0.5))
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        dy = (r[:, 3] * (2 * pad_h + 1)).long().clamp(max=2 * pad_h).tolist()
        dx = (r[:, 4] * (2 * pad_w + 1)).long().clamp(max=2 * pad_w).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + height, dx[i]:dx[i] + width] for i in range(x.shape[0])])
    if "cutout" in policies:  # a zeroed square centred anywhere in the image
        size_h, size_w = int(height * CUTOUT + 0.5), int(width * CUTOUT + 0.5)
        centre_y = (r[:, 5] * (height + 1 - size_h % 2)).long()
        centre_x = (r[:, 6] * (width + 1 - size_w % 2)).long()
        rows = torch.arange(height, device=x.device).view(1, -1, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, -1)
        top, left = (centre_y - size_h // 2).view(-1, 1, 1), (centre_x - size_w // 2).view(-1, 1, 1)
        inside = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x
