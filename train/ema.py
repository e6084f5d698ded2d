"""Exponential moving average of the student's weights, kept on whatever storage this rank owns (its shard
under ZeRO-3 or FSDP2, the whole parameter otherwise: a backend's `local_tensors`), fed from the optimizer's fp32
master weights where the backend keeps them apart from the parameters (`master_tensors`).

Two schedules. A constant decay (`optim.ema_decay`): over a short distillation run it barely moves from the
initial copy (0.9999^4000 = 0.67 of the export is the teacher's UNet). A half-life in images with a ramp
(`optim.ema_halflife_kimg`, `optim.ema_rampup`, as in Karras et al.'s EDM): after n images the average forgets half
its weight every min(H, rampup * n) images, so early in the run it follows the weights closely and the initial
copy's share vanishes, and late in the run it averages over the last H images.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def ema_beta(images_seen: int, batch_images: int, decay: float = 0.0, halflife_images: float = 0.0,
             rampup: float = 0.0) -> float:
    """The weight the average keeps in an update that follows `batch_images` more images, `images_seen` before
    them. With a half-life: 0.5 ** (batch / min(H, rampup * seen)) (the first update takes the weights whole);
    otherwise the constant decay."""
    if halflife_images > 0:
        halflife = min(halflife_images, images_seen * rampup) if rampup > 0 else halflife_images
        return 0.5 ** (batch_images / max(halflife, 1e-8))
    return decay


class EMA:
    def __init__(self, tensors: list[torch.Tensor], decay: float = 0.0, halflife_images: float = 0.0,
                 rampup: float = 0.0):
        self.decay, self.halflife_images, self.rampup = decay, halflife_images, rampup
        self.shadow = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor], images_seen: int = 0, batch_images: int = 1) -> float:
        """Fold in `tensors` (this rank's fp32 masters, or its parameters): the step that trained on
        `batch_images` images after `images_seen` (both global, so every rank and a resume agree). -> beta."""
        beta = ema_beta(images_seen, batch_images, self.decay, self.halflife_images, self.rampup)
        tensors = [t.detach().float() for t in tensors]
        torch._foreach_lerp_(self.shadow, tensors, 1.0 - beta)
        return beta

    @contextlib.contextmanager
    def applied(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Temporarily put the EMA weights into `tensors` (for export or sampling)."""
        backup = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for tensor, shadow in zip(tensors, self.shadow):
                tensor.copy_(shadow.to(tensor.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, saved in zip(tensors, backup):
                    tensor.copy_(saved)

    def load_shadow(self, shadow: list[torch.Tensor]) -> None:
        """Tensors laid out like this rank's parameter storage (a checkpoint reshards them to it)."""
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match this rank's parameter layout")
        self.shadow = [s.float().to(t.device).clone() for s, t in zip(shadow, self.shadow)]
