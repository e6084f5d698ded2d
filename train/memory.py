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


def _meta(build) -> nn.Module:
    with torch.device("meta"):
        return build()


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def trained_state(name: str, params: int, engine, dtype: torch.dtype, world: int, sharded: bool, ema: bool) -> Line:
    """Weights, gradients, optimizer state (AdamW: fp32 master where the weights are not fp32, two fp32 moments)
    and EMA of one trained model on one rank. `sharded`: the backend shards this model."""
    b = dtype.itemsize
    master = 4 if b != 4 else 0  # bf16 weights need an fp32 master copy; fp32 weights are their own
    line = Line(name, params)
    if engine.backend == "fsdp2":
        share = 1 / world if sharded else 1.0
        # the shards are the fp32 masters; one gathered block in the compute dtype at a time (not counted here:
        # a block of an SDXL UNet is a few hundred MB)
        line.weights, line.gradients, line.optimizer = 4 * params * share, 4 * params * share, 8 * params * share
        if sharded and not engine.reshard_after_forward:  # the gathered compute copy stays from forward to backward
            line.weights += b * params
            line.note = f"gathered {str(dtype).replace('torch.', '')} copy kept (reshard_after_forward false)"
        if sharded and engine.offload_param == "cpu":
            line.weights = 0.0 if engine.reshard_after_forward else b * params
            line.gradients = line.optimizer = 0.0
            line.note = "shards, gradients, optimizer on the CPU"
        line.ema = 4 * params * share if ema else 0.0
        return line
    stage = engine.zero if sharded else min(engine.zero, 2 if engine.discriminator_zero is None else engine.discriminator_zero)
    line.weights = b * params / (world if stage == 3 else 1)
    line.gradients = b * params / (world if stage >= 2 else 1)
    if master and stage in (1, 2):  # ZeRO-1/2 also keep fp32 gradients of the rank's partition for the step
        line.gradients += 4 * params / world
    line.optimizer = (master + 8) * params / (world if stage >= 1 else 1)
    if engine.offload_optimizer != "none" and stage >= 1:
        line.optimizer, line.note = 0.0, f"optimizer state on {engine.offload_optimizer}"
    if engine.offload_param != "none" and stage == 3:
        line.weights, line.note = 0.0, f"parameters on {engine.offload_param}" + (f", {line.note}" if line.note else "")
    line.ema = 4 * params / (world if stage == 3 else 1) if ema else 0.0
    return line


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


def _config(cls, name: str, subfolder: Optional[str] = None) -> dict[str, Any]:
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
    return planner(config, world_size, dtype)


def _architecture(model) -> str:
    from addpipe.train.models import detect_architecture

    return model.architecture if model.architecture != "auto" else detect_architecture(model.teacher, model.revision)


def frozen_vae_and_text(config, architecture: str, dtype: torch.dtype) -> tuple[nn.Module, Line, int]:
    """The teacher's VAE (on the meta device), the line of the frozen VAE and text encoders, and the width of the
    pooled text embedding."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = config.model
    vae_config = _config(AutoencoderKL, model.vae) if model.vae else _config(AutoencoderKL, model.teacher, "vae")
    vae = _meta(lambda: AutoencoderKL.from_config(vae_config))
    text_params, pooled = 0, 0
    for sub, cls in [("text_encoder", CLIPTextModel)] + ([("text_encoder_2", CLIPTextModelWithProjection)]
                                                          if architecture == "sdxl" else []):
        text_config = CLIPTextConfig.from_pretrained(model.teacher, subfolder=sub)
        encoder = _meta(lambda: cls(text_config))
        text_params += count(encoder)
        pooled = text_config.projection_dim if cls is CLIPTextModelWithProjection else text_config.hidden_size
    # a VAE that must be upcast (force_upcast) is held in fp32 where the run would use fp16 (train/models.py)
    vae_bytes = (4 if dtype == torch.float16 and vae.config.force_upcast else dtype.itemsize) * count(vae)
    line = Line("VAE + text encoders (frozen)", count(vae) + text_params, weights=vae_bytes + dtype.itemsize * text_params)
    return vae, line, pooled


def plan_add(config, world_size: int, dtype: torch.dtype) -> MemoryPlan:
    """ADD: the student (or its LoRA adapters), the frozen teacher UNet, VAE and text encoders, the frozen
    discriminator networks and the trained heads; the generator phase's activations."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, Dinov2Config, Dinov2Model

    from addpipe.train.discriminator import Discriminator, evenly_spaced_layers
    from addpipe.train.models import clip_text_config

    engine, model, disc = config.engine, config.model, config.discriminator
    b = dtype.itemsize
    world = world_size
    architecture = _architecture(model)
    ema = config.optim.ema_enabled
    plan = MemoryPlan(world, str(dtype).replace("torch.", ""))

    unet_config = _config(UNet2DConditionModel, model.student_init or model.teacher, None if model.student_init else "unet")
    student = _meta(lambda: UNet2DConditionModel.from_config(unet_config))
    student_params = count(student)
    lora = config.student.lora
    if lora.enabled:  # one UNet: the frozen base serves the teacher (adapters off) and the student
        from addpipe.train.lora import peft_config

        student.requires_grad_(False)
        student.add_adapter(peft_config(lora))
        adapters = count(student, trainable_only=True)
        plan.lines.append(trained_state(f"student LoRA adapters, rank {lora.rank} (trained)", adapters, engine, dtype,
                                        world, True, ema))
        sharded = engine.backend == "fsdp2" or engine.zero == 3
        plan.lines.append(Line("UNet base (frozen; teacher = adapters off)", student_params,
                               weights=b * student_params / (world if sharded else 1),
                               note="sharded with the student" if sharded else "replicated"))
    else:
        plan.lines.append(trained_state("student UNet (trained)", student_params, engine, dtype, world, True, ema))
        teacher_unet_params = count(_meta(lambda: UNet2DConditionModel.from_config(
            _config(UNet2DConditionModel, model.teacher, "unet"))))
        partition = model.frozen_placement == "partition"
        plan.lines.append(Line("teacher UNet (frozen)", teacher_unet_params,
                               weights=b * teacher_unet_params / (world if partition else 1),
                               note="sharded" if partition else "replicated"))
    vae, frozen, pooled = frozen_vae_and_text(config, architecture, dtype)
    plan.lines.append(frozen)

    dino_config = Dinov2Config.from_pretrained(disc.feature_network)
    dino = _meta(lambda: Dinov2Model(dino_config))
    frozen_disc = count(dino)
    image_dim = dino_config.hidden_size
    if disc.image_encoder and disc.image_encoder != disc.feature_network:
        image_config = Dinov2Config.from_pretrained(disc.image_encoder)
        frozen_disc += count(_meta(lambda: Dinov2Model(image_config)))
        image_dim = image_config.hidden_size
    text_dim = pooled if disc.text_embedding == "pooled" else int(unet_config["cross_attention_dim"])
    if disc.text_encoder:
        clip_config = clip_text_config(disc.text_encoder)
        text_dim = clip_config.projection_dim
        frozen_disc += count(_meta(lambda: CLIPTextModelWithProjection(clip_config)))
    plan.lines.append(Line("discriminator networks (frozen)", frozen_disc, weights=4 * frozen_disc, note="fp32"))
    layers = list(disc.layers) or evenly_spaced_layers(dino_config.num_hidden_layers, disc.num_heads)
    discriminator = _meta(lambda: Discriminator(dino, layers, text_dim, image_dim, disc.projection_dim, disc.kernel_size,
                                                disc.virtual_batch_size, disc.text_conditioning, disc.image_conditioning,
                                                disc.input_size))
    heads = count(discriminator.heads)
    plan.lines.append(trained_state("discriminator heads (trained)", heads, engine, torch.float32, world, False, False))

    plan.activations, plan.activation_note = _activations(config, student, vae, dino, unet_config, architecture, dtype)
    return plan


def plan_diffusion2gan(config, world_size: int, dtype: torch.dtype) -> MemoryPlan:
    """Diffusion2GAN: the one-step student, the discriminator (a trained copy of the teacher UNet's encoder), the
    frozen VAE and text encoders; no teacher UNet in training (the pairs replace it). Activations: the student's
    forward and the discriminator's on the generated latents (the GAN term flows back through it)."""
    from diffusers import UNet2DConditionModel

    from addpipe.train.unet_discriminator import UNetEncoderDiscriminator

    engine, model = config.engine, config.model
    plan = MemoryPlan(world_size, str(dtype).replace("torch.", ""))
    architecture = _architecture(model)
    unet_config = _config(UNet2DConditionModel, model.student_init or model.teacher, None if model.student_init else "unet")
    student = _meta(lambda: UNet2DConditionModel.from_config(unet_config))
    plan.lines.append(trained_state("student UNet (trained)", count(student), engine, dtype, world_size, True,
                                    config.optim.ema_enabled))
    discriminator = None
    if config.d2g.adversarial:
        teacher_unet = _meta(lambda: UNet2DConditionModel.from_config(_config(UNet2DConditionModel, model.teacher, "unet")))
        discriminator = _meta(lambda: UNetEncoderDiscriminator(teacher_unet))
        plan.lines.append(trained_state("discriminator: UNet encoder (trained)", count(discriminator), engine,
                                        torch.float32, world_size, False, False))
    vae, frozen, _ = frozen_vae_and_text(config, architecture, dtype)
    plan.lines.append(frozen)

    batch = config.data.batch_size
    counter, kwargs, x = _student_inputs(config, student, vae, unet_config, architecture, dtype)
    with counter.counting(student), torch.autocast("cpu", enabled=False):
        out = student.to(dtype)(x, torch.zeros(batch, dtype=torch.long, device="meta"), **kwargs, return_dict=False)[0]
        if discriminator is not None:  # in the generator phase its weights are frozen, its activations are not
            discriminator.requires_grad_(False)
            discriminator.float()(out.float(), torch.zeros(batch, dtype=torch.long, device="meta"), x.float(),
                                  kwargs["encoder_hidden_states"].float(),
                                  {k: v.float() for k, v in kwargs.get("added_cond_kwargs", {}).items()} or None)
    checkpointing = config.model.gradient_checkpointing is True
    how = "gradient checkpointing: block inputs + the largest block" if checkpointing else "no checkpointing"
    plan.activations = counter.total
    plan.activation_note = f"generator phase at batch {batch}, {config.data.resolution}px; {how}; estimated"
    return plan


def _student_inputs(config, student, vae, unet_config, architecture, dtype):
    """A counter, the UNet's conditioning and its latent input at the configured per-rank batch (meta tensors), with
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
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.empty(batch, 77, unet_config["cross_attention_dim"],
                                                                    device="meta", dtype=dtype)}
    if architecture == "sdxl":
        text_embeds = unet_config.get("projection_class_embeddings_input_dim", 2816) - 6 * unet_config.get("addition_time_embed_dim", 256)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text_embeds, device="meta", dtype=dtype),
                                       "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype)}
    x = torch.empty(batch, unet_config["in_channels"], latent, latent, device="meta", dtype=dtype)
    return SavedBytes(), kwargs, x


def _activations(config, student, vae, dino, unet_config, architecture, dtype) -> tuple[float, str]:
    """What the generator phase saves for its backward at the configured per-rank batch: the student UNet (with
    or without gradient checkpointing, as configured), the VAE decoder of the student's x0 (pixel-space losses),
    and the frozen DINOv2 on the decoded fakes (the adversarial loss flows through it)."""
    batch, resolution = config.data.batch_size, config.data.resolution
    checkpointing = config.model.gradient_checkpointing is True
    counter, kwargs, x = _student_inputs(config, student, vae, unet_config, architecture, dtype)
    with counter.counting(student, vae), torch.autocast("cpu", enabled=False):
        student = student.to(dtype)
        out = student(x, torch.zeros(batch, dtype=torch.long, device="meta"), **kwargs, return_dict=False)[0]
        if config.distill.resolved_space == "pixel" or config.distill.adversarial:
            vae = vae.to(dtype)
            pixels = vae.decode(out[:, : vae.config.latent_channels], return_dict=False)[0]
            if config.distill.adversarial:
                size = config.discriminator.input_size
                resized = torch.nn.functional.interpolate(pixels.float(), size=(size, size), mode="bilinear",
                                                          antialias=False)
                dino(pixel_values=resized, output_hidden_states=True)
    how = "gradient checkpointing: block inputs + the largest block" if checkpointing else "no checkpointing"
    return counter.total, f"generator phase at batch {batch}, {resolution}px; {how}; estimated"


def gpu_memory_gib(device: torch.device) -> Optional[float]:
    """The GPU's memory in GiB; None on a CPU."""
    return torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None


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
