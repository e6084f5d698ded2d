"""Diffusion2GAN's memory plan: its models and its generator phase's activations, counted on the meta device
with train/memory.py's accounting."""

from __future__ import annotations

import torch

from addpipe.train.memory import (MemoryPlan, family_of, count, frozen_vae_and_text, meta, model_config,
                                  student_inputs, trained_state)


def plan_diffusion2gan(config, world_size: int, dtype: torch.dtype) -> MemoryPlan:
    """Diffusion2GAN: the one-step student, the discriminator (a trained copy of the teacher UNet's encoder), the
    frozen VAE and text encoders; no teacher UNet in training (the pairs replace it). Activations: the student's
    forward and the discriminator's on the generated latents (the GAN term flows back through it)."""
    from diffusers import UNet2DConditionModel

    from addpipe.train.methods.diffusion2gan.unet_discriminator import UNetEncoderDiscriminator

    engine, model = config.engine, config.model
    plan = MemoryPlan(world_size, str(dtype).replace("torch.", ""))
    family = family_of(model)
    unet_config = model_config(UNet2DConditionModel, model.student_init or model.teacher, None if model.student_init else "unet")
    student = meta(lambda: UNet2DConditionModel.from_config(unet_config))
    plan.lines.append(trained_state("student UNet (trained)", count(student), engine, dtype, world_size, True,
                                    config.optim.ema_enabled))
    discriminator = None
    if config.d2g.adversarial:
        teacher_unet = meta(lambda: UNet2DConditionModel.from_config(model_config(UNet2DConditionModel, model.teacher, "unet")))
        discriminator = meta(lambda: UNetEncoderDiscriminator(teacher_unet))
        plan.lines.append(trained_state("discriminator: UNet encoder (trained)", count(discriminator), engine,
                                        torch.float32, world_size, False, False))
    vae, frozen, _ = frozen_vae_and_text(config, family, dtype)
    plan.lines.append(frozen)

    batch = config.data.batch_size
    counter, kwargs, x = student_inputs(config, student, vae, unet_config, family, dtype)
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
