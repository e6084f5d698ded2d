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


def synchronize(device: torch.device) -> None:
    """Wait for the device to finish what was queued (a no-op on the CPU, whose work is done when queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allow_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the fp32 matmuls and convolutions left in a bf16 run (the frozen networks' fp32
    parts, the discriminator heads, the VAE decode in fp32): ~8x the fp32 rate on Ampere and later, at 10-bit
    mantissas, which those parts tolerate (PyTorch leaves it off for matmuls by default)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast to `dtype`, or nothing at fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
