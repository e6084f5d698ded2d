"""ADD's memory plan (`addpipe train --dry-run`, `model.gradient_checkpointing: auto`): its models and its
generator phase's activations, counted on the meta device with train/memory.py's accounting."""

from __future__ import annotations

import torch

from addpipe.train.backends import backend_class
from addpipe.train.memory import (MemoryPlan, Line, family_of, count, frozen_vae_and_text, meta, model_config,
                                  student_inputs, trained_state)


def plan_add(config, world_size: int, dtype: torch.dtype) -> MemoryPlan:
    """ADD: the student (or its LoRA adapters), the frozen teacher UNet, VAE and text encoders, the frozen
    discriminator networks and the trained heads; the generator phase's activations."""
    from transformers import CLIPTextModelWithProjection, Dinov2Config, Dinov2Model

    from addpipe.train.methods.add.discriminator import Discriminator, evenly_spaced_layers
    from addpipe.train.models import clip_text_config

    engine, model, disc = config.engine, config.model, config.discriminator
    b = dtype.itemsize
    world = world_size
    family = family_of(model)
    ema = config.optim.ema_enabled
    plan = MemoryPlan(world, str(dtype).replace("torch.", ""))

    denoiser, folder = family.denoiser_class(), family.denoiser_folder
    kind = "UNet" if folder == "unet" else folder  # what the plan's lines call the denoiser
    unet_config = model_config(denoiser, model.student_init or model.teacher, None if model.student_init else folder)
    student = meta(lambda: denoiser.from_config(unet_config))
    student_params = count(student)
    lora = config.student.lora
    if lora.enabled:  # one UNet: the frozen base serves the teacher (adapters off) and the student
        from addpipe.train.lora import peft_config

        student.requires_grad_(False)
        student.add_adapter(peft_config(lora))
        adapters = count(student, trainable_only=True)
        plan.lines.append(trained_state(f"student LoRA adapters, rank {lora.rank} (trained)", adapters, engine, dtype,
                                        world, True, ema))
        sharded = backend_class(engine.backend).shards_weights(engine)
        plan.lines.append(Line(f"{kind} base (frozen; teacher = adapters off)", student_params,
                               weights=b * student_params / (world if sharded else 1),
                               note="sharded with the student" if sharded else "replicated"))
    else:
        plan.lines.append(trained_state(f"student {kind} (trained)", student_params, engine, dtype, world, True, ema))
        teacher_unet_params = count(meta(lambda: denoiser.from_config(model_config(denoiser, model.teacher, folder))))
        partition = model.frozen_placement == "partition"
        plan.lines.append(Line(f"teacher {kind} (frozen)", teacher_unet_params,
                               weights=b * teacher_unet_params / (world if partition else 1),
                               note="sharded" if partition else "replicated"))
    vae, frozen, pooled = frozen_vae_and_text(config, family, dtype)
    plan.lines.append(frozen)

    dino_config = Dinov2Config.from_pretrained(disc.feature_network)
    dino = meta(lambda: Dinov2Model(dino_config))
    frozen_disc = count(dino)
    image_dim = dino_config.hidden_size
    if disc.image_encoder and disc.image_encoder != disc.feature_network:
        image_config = Dinov2Config.from_pretrained(disc.image_encoder)
        frozen_disc += count(meta(lambda: Dinov2Model(image_config)))
        image_dim = image_config.hidden_size
    text_dim = pooled if disc.text_embedding == "pooled" else family.token_width(unet_config)
    if disc.text_encoder:
        clip_config = clip_text_config(disc.text_encoder)
        text_dim = clip_config.projection_dim
        frozen_disc += count(meta(lambda: CLIPTextModelWithProjection(clip_config)))
    plan.lines.append(Line("discriminator networks (frozen)", frozen_disc, weights=4 * frozen_disc, note="fp32"))
    layers = list(disc.layers) or evenly_spaced_layers(dino_config.num_hidden_layers, disc.num_heads)
    discriminator = meta(lambda: Discriminator(dino, layers, text_dim, image_dim, disc.projection_dim, disc.kernel_size,
                                                disc.virtual_batch_size, disc.text_conditioning, disc.image_conditioning,
                                                disc.input_size))
    heads = count(discriminator.heads)
    plan.lines.append(trained_state("discriminator heads (trained)", heads, engine, torch.float32, world, False, False))

    plan.activations, plan.activation_note = _activations(config, student, vae, dino, unet_config, family, dtype)
    return plan


def _activations(config, student, vae, dino, unet_config, family, dtype) -> tuple[float, str]:
    """What the generator phase saves for its backward at the configured per-rank batch: the student UNet (with
    or without gradient checkpointing, as configured), the VAE decoder of the student's x0 (pixel-space losses),
    and the frozen DINOv2 on the decoded fakes (the adversarial loss flows through it)."""
    batch, resolution = config.data.batch_size, config.data.resolution
    checkpointing = config.model.gradient_checkpointing is True
    counter, kwargs, x = student_inputs(config, student, vae, unet_config, family, dtype)
    with counter.counting(student, vae), torch.autocast("cpu", enabled=False):
        student = student.to(dtype)
        out = family.planning_output(student, x, kwargs)
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
