"""Exponential moving average of the student's weights, kept on whatever storage this rank owns (its shard
under ZeRO-3 or FSDP2, the whole parameter otherwise: a backend's `local_tensors`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, tensors: list[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [t.detach().float().clone() for t in tensors]

    @torch.no_grad()
    def update(self, tensors: list[torch.Tensor]) -> None:
        for shadow, tensor in zip(self.shadow, tensors):
            shadow.lerp_(tensor.detach().float(), 1.0 - self.decay)

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

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.load_shadow(state["shadow"])

    def load_shadow(self, shadow: list[torch.Tensor]) -> None:
        """Tensors laid out like this rank's parameter storage (a checkpoint reshards them to it)."""
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow)):
            raise ValueError("EMA state does not match this rank's parameter layout")
        self.shadow = [s.float().to(t.device).clone() for s, t in zip(shadow, self.shadow)]
