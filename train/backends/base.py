"""The backend seam: what the loop, checkpoints, the EMA and export may ask of a distribution backend.

A backend wraps each trainable model with its optimizer and learning-rate schedule into a `Trained`, and
places each frozen model (replicated, or sharded without an optimizer). Nothing outside `train/backends/`
touches an engine's own API; methods call `Trained.forward` (through the engine) or `Trained.module` (the
bare network, for passes the engine must not see, such as R1's double backward).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn


@dataclass
class OptimizerSettings:
    """AdamW settings and the learning-rate schedule (a factor of the step) of one trainable model."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    schedule: Callable[[int], float]
    gradient_clipping: float = 0.0


class Trained(ABC):
    """One trainable model inside a backend."""

    name: str
    module: nn.Module          # the bare network: its parameters, its forward without the engine
    trainable: list[nn.Parameter]
    shards_parameters: bool = False
    """Whether a forward gathers parameters from the other ranks: then every rank must run the same forwards."""

    @abstractmethod
    def forward(self, *args, **kwargs) -> Any:
        """A forward pass through the engine (what a training step's main forward should use)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> None:
        """Clip, take the optimizer and schedule step, and clear the gradients."""

    @abstractmethod
    def learning_rate(self) -> float: ...

    @abstractmethod
    def set_hyperparameters(self, settings: OptimizerSettings) -> None:
        """Put configured optimizer settings into a restored optimizer (a resumed run trains with its config)."""

    @abstractmethod
    def local_tensors(self) -> list[torch.Tensor]:
        """The trainable parameters' storage this rank owns, in `module.parameters()` order: its shard where the
        backend shards, the whole parameter where it replicates. The EMA lives on these, partitioned like the model
        (a LoRA student's EMA covers its adapters, not the frozen base)."""

    def master_tensors(self) -> list[torch.Tensor]:
        """The optimizer's fp32 master weights laid out like `local_tensors` (what the EMA averages): the parameters
        themselves where they are the masters (fp32 training, FSDP2's fp32 shards)."""
        return self.local_tensors()

    @abstractmethod
    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: every parameter and buffer whole, on CPU, on rank 0 (None on the others)."""

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Inside: every parameter of `module` is whole on every rank. All ranks enter together."""
        yield

    # ---- checkpoints (see train/checkpoint.py for the format) ----------------------------------------------
    @abstractmethod
    def checkpoint_state(self) -> dict[str, Any]:
        """This rank's part of a resharding checkpoint: `model.<name>` (fp32 master weights) and
        `optim.<name>.<state>` (Adam's moments) entries, each a DTensor or a whole tensor this rank owns."""

    @abstractmethod
    def load_checkpoint_state(self, load: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Fill the model and optimizer from a checkpoint: `load(template)` returns the template with the
        saved values put in (the backend says which entries it wants, in the shape it wants them)."""

    @abstractmethod
    def parameter_entries(self, prefix: str, tensors: list[torch.Tensor]) -> dict[str, Any]:
        """Per-parameter tensors shaped like `local_tensors()` (e.g. an EMA) as checkpoint entries
        `<prefix>.<parameter name>`, resharding like the parameters themselves (collective)."""

    @abstractmethod
    def load_parameter_entries(self, prefix: str, load: Callable[[dict[str, Any]], dict[str, Any]]) -> list[torch.Tensor]:
        """The inverse of `parameter_entries`: this rank's local tensors, in `local_tensors()` order (collective)."""

    @abstractmethod
    def optimizer_steps(self) -> int:
        """How many steps the optimizer has taken (Adam's bias correction counts them)."""

    @abstractmethod
    def set_optimizer_steps(self, steps: int) -> None: ...

    def schedule_state(self) -> dict[str, Any]:
        return {"last_epoch": int(self.scheduler.last_epoch)}

    def load_schedule_state(self, state: dict[str, Any], settings: OptimizerSettings) -> None:
        """The schedule continues at the saved step, from the configured base rate."""
        self.scheduler.last_epoch = int(state["last_epoch"])
        self.set_hyperparameters(settings)

    def describe(self) -> str:
        """How this model is placed, for --dry-run and the logs."""
        return type(self).__name__


@dataclass
class StateBytes:
    """What one trained model's states take on one rank, in bytes (the memory plan's accounting)."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    note: str = ""


class Backend(ABC):
    """Process-wide: starts the process group, builds `Trained` models and places frozen ones, and says what its
    placement costs in memory before anything is built."""

    name: str

    @classmethod
    @abstractmethod
    def create(cls, config, device: torch.device, dtype: torch.dtype) -> "Backend":
        """This process's backend for the training config `config` (its engine section and what else it needs)."""

    @staticmethod
    def start_process_group(engine, group: str) -> None:
        """Start the process group `group` (nccl, gloo) for this backend; `engine`: the config's engine section."""
        import torch.distributed as dist

        dist.init_process_group(backend=group)

    @staticmethod
    @abstractmethod
    def shards_weights(engine) -> bool:
        """Whether the student's weights are split across ranks (a LoRA student's frozen base goes with them)."""

    @staticmethod
    @abstractmethod
    def state_bytes(engine, params: int, dtype: torch.dtype, world: int, sharded: bool, ema: bool) -> StateBytes:
        """Weights, gradients, optimizer state (AdamW: an fp32 master where the weights are not fp32, two fp32
        moments) and EMA of one trained model of `params` parameters on one rank; `sharded`: the model is one the
        backend shards (the student), else one it keeps whole or at a lower stage (the discriminator heads)."""

    @abstractmethod
    def wrap(self, name: str, module: nn.Module, trainable: list[nn.Parameter], settings: OptimizerSettings,
             shard: bool) -> Trained:
        """`module`'s `trainable` parameters get an AdamW optimizer and the schedule; `shard` chooses between
        sharding the model's parameters across ranks and replicating them."""

    @abstractmethod
    def place_frozen(self, module: nn.Module, shard: bool) -> nn.Module:
        """A frozen network on this rank's device, replicated or sharded across ranks without an optimizer;
        returns what to call for its forward."""

    @staticmethod
    def describe_plan(config) -> dict[str, str]:
        """Placement of each model for --dry-run, from the config alone (nothing is built)."""
        return {}


def owner(index: int) -> int:
    """The rank that writes and reads a whole (unsharded) tensor of a checkpoint: parameter i belongs to rank
    i mod world size, so every rank holds about 1/world of the whole tensors at once."""
    from addpipe.train import distributed

    return index % distributed.world_size()


def broadcast_owned(index: int, loaded: dict[str, Any], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole tensor `key`, read by its owner, on every rank (collective)."""
    from addpipe.train import distributed

    value = loaded[key] if owner(index) == distributed.rank() else torch.empty(shape, dtype=torch.float32)
    return distributed.broadcast(value, src=owner(index))
