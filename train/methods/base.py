"""The method seam: what a training objective gives the loop.

A method builds the models it needs (wrapping its trainable ones through the backend and placing its frozen
ones), turns each batch into its own per-step state, and lists its phases. A phase names the trainable model
it updates, how often it runs, and a function from the step state to named loss terms, one of which is the
total that phase minimises. The loop runs the phases in order, with every other model's parameters frozen
during each; it knows nothing of teachers, discriminators or noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from addpipe.train.backends import Backend, OptimizerSettings, Trained
from addpipe.train.config import TrainConfig
from addpipe.train.data import ImageSamples, SampleFormat


@dataclass
class Phase:
    name: str
    """For logs and --dry-run (e.g. 'generator', 'discriminator')."""
    model: str
    """The trainable model this phase updates (a key of Method.build's result)."""
    run: Callable[[Any], dict[str, torch.Tensor]]
    """Step state -> named terms for the metrics, `total` among them."""
    total: str
    """Which term the phase minimises."""
    interval: int = 1
    """The phase runs on the steps (counted from 0) divisible by this."""


class Method(ABC):
    """One training objective. `name` is what `method:` in the config says."""

    name: str = ""
    config_class: type = TrainConfig
    """The method's config tree: TrainConfig, or a subclass adding the method's own sections (its config.py)."""
    ema_model: str = "student"
    """The trained model whose weights the EMA follows and the export writes."""
    memory_plan: Optional[Callable[[Any, int, torch.dtype], Any]] = None
    """(config, world size, dtype) -> train.memory.MemoryPlan of this method's models, built on the meta device;
    `--dry-run` prints it and `model.gradient_checkpointing: auto` decides from it. None: no plan (auto then
    means on, and says why)."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype

    @abstractmethod
    def build(self, backend: Backend) -> dict[str, Trained]:
        """Load the networks, wrap the trainable ones through `backend`, place the frozen ones."""

    @abstractmethod
    def phases(self) -> list[Phase]: ...

    @abstractmethod
    def optimizer_settings(self) -> dict[str, OptimizerSettings]:
        """Each trained model's optimizer settings as configured now (a resumed run puts these in)."""

    @abstractmethod
    def begin_step(self, batch, step: int) -> Any:
        """The per-step state every phase of this step reads (and may add to)."""

    def data_signature(self) -> Optional[dict[str, Any]]:
        """What precomputed tensors in the shards must match to be used (None: never use them)."""
        return None

    def sample_format(self) -> SampleFormat:
        """What the method trains on: by default the shards' images and captions (with the precomputed tensors that
        match data_signature); a method that reads something else returns its own format (train/data.py)."""
        data = self.config.data
        return ImageSamples(data.resolution, data.caption_key, self.data_signature())

    def sample_grid(self, path: Path, step: int) -> Optional[Path]:
        """Collective: write a grid of samples for a person to look at; the path on rank 0."""
        return None

    @abstractmethod
    def export(self, out_dir: Path) -> Path:
        """Collective: write the trained result where users load it from (the EMA is already applied)."""

    @staticmethod
    def describe_plan(config) -> dict[str, str]:
        """The models and phases, for --dry-run, from the config alone."""
        return {}

    @staticmethod
    def describe_placement(config, placement: dict[str, str]) -> dict[str, str]:
        """The backend's placement lines (student, discriminator heads, frozen teacher UNet, ...) as they apply to
        this method's models, for --dry-run."""
        return placement
