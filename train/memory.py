"""A memory plan before the run (`addpipe train --dry-run`): per rank, what each model's weights, gradients,
optimizer state and EMA take under the configured backend, ZeRO stage / sharding, offload and precision, what the
training step's activations take at the configured batch and checkpointing, and whether it fits a GPU.

Nothing is loaded: every network is built from its config on PyTorch's meta device (shapes, no storage), which
gives exact parameter counts, and the step's activations are measured by running the student UNet, the VAE
decoder and the discriminator's feature network forward on meta tensors while counting what autograd saves for
the backward (`torch.autograd.graph.saved_tensors_hooks`). With gradient checkpointing, what a checkpointed block
saves is kept only while that block is recomputed: the plan counts each block's inputs, plus the largest block's
own saves. Activations are an estimate (a tensor saved by two operations is counted twice; allocator
fragmentation and workspace are not counted); states follow the ZeRO paper's accounting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

GIB = 1024 ** 3
HEADROOM = 0.85
"""A plan fits a GPU when it takes at most this share of its memory: the CUDA context, cuBLAS/cuDNN workspaces and
the caching allocator's fragmentation take the rest (the SDXL run on an H100 reserved 76 GiB for 67 allocated)."""


@dataclass
class Line:
    name: str
    params: int
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    note: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema


@dataclass
class MemoryPlan:
    world_size: int
    precision: str
    lines: list[Line] = field(default_factory=list)
    activations: float = 0.0
    activation_note: str = ""

    @property
    def total(self) -> float:
        return sum(line.total for line in self.lines) + self.activations

    def fits(self, gpu_gib: float) -> bool:
        return self.total <= HEADROOM * gpu_gib * GIB

    def describe(self, gpu_gib: Optional[float] = None) -> str:
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024 ** 2)
        rows = [f"# memory per rank ({self.world_size} rank(s), {self.precision}; {unit}): params, weights, gradients, "
                "optimizer, EMA"]
        for line in self.lines:
            rows.append(f"#   {line.name:32s} {line.params / 1e6:9.1f}M  {line.weights / size:8.2f} {line.gradients / size:8.2f} "
                        f"{line.optimizer / size:8.2f} {line.ema / size:8.2f}" + (f"  ({line.note})" if line.note else ""))
        rows.append(f"#   {'activations':32s} {'':10s}  {self.activations / size:8.2f}  ({self.activation_note})")
        verdict = ""
        if gpu_gib:
            share = self.total / GIB / gpu_gib
            verdict = (f": fits {gpu_gib:g} GiB ({share:.0%}; up to {HEADROOM:.0%} is taken to fit)" if self.fits(gpu_gib)
                       else f": does NOT fit {gpu_gib:g} GiB ({share:.0%}; more than {HEADROOM:.0%} is taken not to)")
        rows.append(f"#   total {self.total / size:.2f} {unit} per rank{verdict}")
        return "\n".join(rows) + "\n"


def meta(build) -> nn.Module:
    with torch.device("meta"):
        return build()


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trained_state(name: str, params: int, engine, dtype: torch.dtype, world: int, sharded: bool, ema: bool) -> Line:
    """The line of one trained model on one rank: its states as the configured backend places them
    (train/backends/: Backend.state_bytes). `sharded`: the backend shards this model."""
    from addpipe.train.backends import backend_class

    states = backend_class(engine.backend).state_bytes(engine, params, dtype, world, sharded, ema)
    return Line(name, params, states.weights, states.gradients, states.optimizer, states.ema, states.note)


class SavedBytes:
    """Bytes autograd saves for the backward while active; checkpointed regions counted as the plan says."""

    def __init__(self) -> None:
        self.stack = [0.0]
        self.largest_region = 0.0

    def pack(self, tensor: torch.Tensor):
        if not isinstance(tensor, nn.Parameter):  # a parameter is saved by reference, not copied
            self.stack[-1] += tensor.numel() * tensor.element_size()
        return tensor

    def region(self, function, *args, **kwargs):
        """Stands in for torch.utils.checkpoint: the inputs stay saved, the inside only while recomputed."""
        self.stack[-1] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        self.stack.append(0.0)
        try:
            return function(*args, **kwargs)
        finally:
            self.largest_region = max(self.largest_region, self.stack.pop())

    @property
    def total(self) -> float:
        return self.stack[0] + self.largest_region

    @contextlib.contextmanager
    def counting(self, *modules: nn.Module) -> Iterator[None]:
        hooked = [m for module in modules for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
        saved = [getattr(m, "_gradient_checkpointing_func", None) for m in hooked]
        for module in hooked:
            module._gradient_checkpointing_func = self.region
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield
        finally:
            for module, function in zip(hooked, saved):
                module._gradient_checkpointing_func = function


def model_config(cls, name: str, subfolder: Optional[str] = None) -> dict[str, Any]:
    from addpipe.train.models import ModelLoadError

    try:
        return cls.load_config(name, subfolder=subfolder) if subfolder else cls.load_config(name)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"memory plan: cannot read the config of {name}{'/' + subfolder if subfolder else ''}: "
                             f"{error}") from None


def plan_memory(config, world_size: int = 1, dtype: Optional[torch.dtype] = None) -> MemoryPlan:
    """The memory plan of `config` on `world_size` ranks, in `dtype` (default: bf16 when the config's precision is
    auto or bf16, as on a GPU that supports it): the plan of the configured method's own models."""
    from addpipe.train.methods import method_class

    planner = method_class(config.method).memory_plan
    if planner is None:
        raise ValueError(f"method {config.method} has no memory plan (Method.memory_plan)")
    dtype = dtype or (torch.float32 if config.engine.precision == "fp32" else torch.bfloat16)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting meta models warns "modules that should be kept in float32: []"
    try:
        return planner(config, world_size, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def family_of(model):
    """The model family (train/families/) of `model` (a ModelConfig): named, or found from the teacher's directory."""
    from addpipe.train.families import family
    from addpipe.train.models import resolve_architecture

    return family(resolve_architecture(model))


def frozen_vae_and_text(config, family, dtype: torch.dtype) -> tuple[nn.Module, Line, int]:
    """The teacher's VAE (on the meta device), the line of the frozen VAE and text encoders, and the width of the
    pooled text embedding."""
    from diffusers import AutoencoderKL

    model = config.model
    vae_config = model_config(AutoencoderKL, model.vae) if model.vae else model_config(AutoencoderKL, model.teacher, "vae")
    vae = meta(lambda: AutoencoderKL.from_config(vae_config))
    text_params, encoders = 0, []
    for sub, cls in family.text_encoders():
        try:
            text_config = cls.config_class.from_pretrained(model.teacher, subfolder=sub)
        except OSError:
            if sub in family.optional_text_encoders:  # a pipeline without it (SD3 without T5)
                continue
            raise
        encoder = meta(lambda: cls(text_config))
        text_params += count(encoder)
        encoders.append((cls, text_config))
    pooled = family.pooled_width(encoders)
    # a VAE that must be upcast (force_upcast) is held in fp32 where the run would use fp16 (train/models.py)
    vae_bytes = (4 if dtype == torch.float16 and vae.config.force_upcast else dtype.itemsize) * count(vae)
    line = Line("VAE + text encoders (frozen)", count(vae) + text_params, weights=vae_bytes + dtype.itemsize * text_params)
    return vae, line, pooled


def student_inputs(config, student, vae, unet_config, family, dtype):
    """A counter, the denoiser's conditioning (as its family takes it) and its latent input at the configured per-rank batch (meta tensors), with
    the student prepared for counting: training mode, gradient checkpointing as configured, weights requiring grad."""
    batch, resolution = config.data.batch_size, config.data.resolution
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = resolution // factor
    if config.model.gradient_checkpointing is True:
        student.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    student.train()
    if not config.student.lora.enabled:  # a LoRA student's base stays frozen: no weight gradient saves its input
        for p in student.parameters():
            p.requires_grad_(True)
    x, kwargs = family.planning_inputs(unet_config, batch, latent, dtype)
    return SavedBytes(), kwargs, x


def gpu_memory_gib(device: torch.device) -> Optional[float]:
    """The GPU's memory in GiB; None on a CPU."""
    return torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None


def resolve_checkpointing(config, world_size: int, gpu_gib: Optional[float], unknown_gpu: bool = False) -> Optional[str]:
    """Make `model.gradient_checkpointing: auto` concrete in `config`, in place, the one way the run and --dry-run
    both use; -> why (None when it was not auto). `unknown_gpu`: what to plan with when the GPU's size is not known
    (--dry-run without --gpu-memory plans with it on; a run without a GPU has nothing to save)."""
    if config.model.gradient_checkpointing != "auto":
        return None
    if gpu_gib is None and unknown_gpu:
        config.model.gradient_checkpointing = True
        return "planned with it on; --gpu-memory decides"
    config.model.gradient_checkpointing, why = decide_checkpointing(config, world_size, gpu_gib)
    return why


def decide_checkpointing(config, world_size: int, gpu_gib: Optional[float]) -> tuple[bool, str]:
    """`model.gradient_checkpointing: auto` made concrete: (on?, why). With a GPU of `gpu_gib` GiB, off when the
    plan without it fits, on otherwise or when no plan can be made; without a GPU (None), off."""
    import copy

    if gpu_gib is None:
        return False, "off: no GPU memory to save"
    without = copy.deepcopy(config)
    without.model.gradient_checkpointing = False
    try:
        plan = plan_memory(without, world_size)
    except Exception as error:  # a config the plan cannot read: the safe choice, and why
        return True, f"on: no memory plan ({str(error).strip().splitlines()[0]})"
    share = plan.total / GIB / gpu_gib
    if plan.fits(gpu_gib):
        return False, f"off: without it the plan takes {plan.total / GIB:.1f} of {gpu_gib:.0f} GiB ({share:.0%})"
    return True, f"on: without it the plan takes {plan.total / GIB:.1f} of {gpu_gib:.0f} GiB ({share:.0%})"
