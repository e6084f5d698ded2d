"""Distribution backends behind one interface (base.py): DeepSpeed (deepspeed.py, its native ops in
deepspeed_ops.py) and PyTorch FSDP2 (fsdp2.py).

Only the modules in this folder call an engine's own API or know what its placement costs in memory; the loop,
checkpoints, EMA, export and the memory plan go through `Backend` and `Trained`.
"""

from __future__ import annotations

import importlib

import torch

from addpipe.train import distributed
from addpipe.train.backends.base import Backend, OptimizerSettings, StateBytes, Trained

_BACKENDS = {"deepspeed": "addpipe.train.backends.deepspeed:DeepSpeedBackend",
             "fsdp2": "addpipe.train.backends.fsdp2:FSDP2Backend"}
BACKENDS = tuple(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def initialize(engine) -> torch.device:
    """Start this process's process group the way `engine.backend` does (once); -> this rank's device."""
    backend = backend_class(engine.backend)
    return distributed.initialize(lambda group: backend.start_process_group(engine, group), engine.process_group)


def build_backend(config, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend `config.engine.backend` names, for this process."""
    return backend_class(config.engine.backend).create(config, device, dtype)


__all__ = ["BACKENDS", "Backend", "OptimizerSettings", "StateBytes", "Trained", "backend_class", "build_backend",
           "initialize"]
