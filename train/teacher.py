"""Pretraining a small teacher with plain diffusion training, for the offline demo.

ADD needs a teacher that already draws the data. On a machine with no downloadable weights the demo
makes one: first the VAE learns to reconstruct the shards' images, then the UNet learns the usual
denoising objective on those latents (with 10% empty captions so guidance works), predicting whatever the
pipeline's scheduler says (epsilon, or v on a zero-terminal-SNR schedule, as the demo's teacher does). The
result is saved in place as a diffusers pipeline directory, which `addpipe train` then loads like any hub model.

The text encoder trains with the UNet (as GLIDE's did) unless told not to. A real teacher's CLIP text
encoder arrives pretrained; a random-init one, frozen, maps different prompts to nearly the same pooled
embedding (cosine 0.85-0.98 measured), which left the teacher reading the digit poorly and gave the ADD
discriminator's text condition almost nothing to go on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from addpipe.train.config import DataConfig, ModelConfig
from addpipe.train.data import TrainingData
from addpipe.train.models import encode_prompts, load_teacher, vae_encode
from addpipe.train.schedule import add_noise, diffusion_target, pipeline_schedule

logger = logging.getLogger(__name__)


def pretrain_teacher(directory: Path, shards: str, resolution: int, vae_steps: int, unet_steps: int,
                     batch_size: int = 32, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                     train_text_encoder: bool = True, device: str = "cpu") -> Path:
    """Train the VAE, then the UNet (and text encoder), of the pipeline in `directory` on `shards`; save in place."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    components = load_teacher(ModelConfig(teacher=str(directory)))
    for module in (components.vae, components.unet, *components.text_encoders):
        module.to(device)
    data = TrainingData(DataConfig(shards=shards, resolution=resolution, batch_size=batch_size, num_workers=0, seed=seed), 0, 1)

    vae = components.vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    for _ in tqdm(range(vae_steps), desc="teacher VAE", disable=not progress):
        pixels = next(data).pixels.to(device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # rescale latents to unit variance, as SD's scaling factor does
        std = torch.cat([vae.encode(next(data).pixels.to(device)).latent_dist.mean for _ in range(4)]).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)

    schedule = pipeline_schedule(components.scheduler_config).to(device)
    unet = components.unet.train().requires_grad_(True)
    text_encoder = components.text_encoders[0].train().requires_grad_(train_text_encoder)
    groups = [{"params": list(unet.parameters())}]
    if train_text_encoder:
        # no weight decay here: it would shrink the ~49k token embeddings the captions never use
        groups.append({"params": list(text_encoder.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    # cosine decay to 5%: the last steps average out the noise of a high constant rate
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, unet_steps))))
    bar = tqdm(range(unet_steps), desc="teacher UNet", disable=not progress)
    for _ in bar:
        batch = next(data)
        with torch.no_grad():
            latents = vae_encode(components, batch.pixels.to(device))
        captions = [c if torch.rand(()) > 0.1 else "" for c in batch.captions]
        conditioning = encode_prompts(components, captions, device, grad=train_text_encoder)
        t = torch.randint(0, schedule.num_train_timesteps, (latents.shape[0],)).to(device)
        noise = torch.randn_like(latents)
        alpha, sigma = schedule.at(t, latents.ndim)
        prediction = unet(add_noise(latents, noise, alpha, sigma), t, **conditioning.unet_kwargs(None),
                          return_dict=False)[0]
        loss = F.mse_loss(prediction, diffusion_target(latents, noise, alpha, sigma, schedule.prediction_type))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], 1.0)
        optimizer.step()
        decay.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval().requires_grad_(False).cpu()
    text_encoder.eval().requires_grad_(False).cpu()
    vae.cpu()

    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=components.tokenizers[0], unet=unet,
        scheduler=DDPMScheduler.from_config(components.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)
    return Path(directory)

