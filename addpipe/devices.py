"""Devices and numeric precision, for every stage that runs a network (curation's CLIP, training, evaluation)."""

from __future__ import annotations

import contextlib

import torch

# The normalisation torchvision's and DINOv2's ImageNet-trained networks expect (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda when available, else cpu; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp32; fp32 / bf16: as asked."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast to `dtype`, or nothing at fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
