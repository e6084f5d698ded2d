"""Distribution backends behind one interface (base.py): DeepSpeed (deepspeed.py) and PyTorch FSDP2 (fsdp2.py).

Only the modules in this folder call an engine's own API; the loop, checkpoints, EMA and export go through
`Backend` and `Trained`.
"""

from __future__ import annotations

import torch

from addpipe.train.backends.base import Backend, OptimizerSettings, Trained

BACKENDS = ("deepspeed", "fsdp2")


def backend_class(name: str) -> type[Backend]:
    if name == "deepspeed":
        from addpipe.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend
    if name == "fsdp2":
        from addpipe.train.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend
    raise ValueError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")


def build_backend(config, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend `config.engine.backend` names, for this process."""
    if config.engine.backend == "deepspeed":
        from addpipe.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(config.engine, config.data.batch_size, dtype)
    from addpipe.train.backends.fsdp2 import FSDP2Backend

    return FSDP2Backend(config.engine, device, dtype)


__all__ = ["BACKENDS", "Backend", "OptimizerSettings", "Trained", "backend_class", "build_backend"]
