"""Diffusion2GAN's conditional diffusion discriminator: the teacher UNet's encoder, with its pretrained weights.

D(x_t, t, z, c) reads a latent noised to timestep t (both real and generated latents are diffused before D sees
them, as in a diffusion GAN), concatenated along channels with the generator's input noise z, so D judges whether
x belongs to that z (a paired, pix2pix-style conditional GAN) and not only whether it looks real. The text c enters
through the UNet's own cross-attention (and, for SDXL, its pooled-text and size embedding). The down blocks and the
mid block run as in diffusers' UNet2DConditionModel.forward; after each, a small head (group norm, SiLU, 1x1
convolution) gives a logit map, so D is multi-scale. The input convolution's weights for z start at zero: at
initialisation D computes the pretrained encoder's features of x_t.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn as nn


class UNetEncoderDiscriminator(nn.Module):
    def __init__(self, unet: nn.Module, condition_on_noise: bool = True):
        super().__init__()
        self.encoder = copy.deepcopy(unet)  # the teacher stays untouched; its decoder half is dropped below
        self.encoder.up_blocks = nn.ModuleList()
        self.encoder.conv_norm_out, self.encoder.conv_act, self.encoder.conv_out = None, None, None
        self.encoder.requires_grad_(True)
        self.encoder.train()
        self.condition_on_noise = condition_on_noise
        if condition_on_noise:
            old = self.encoder.conv_in
            wider = nn.Conv2d(old.in_channels * 2, old.out_channels, old.kernel_size, old.stride, old.padding,
                              device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                wider.weight.zero_()
                wider.weight[:, : old.in_channels] = old.weight
                wider.bias.copy_(old.bias)
            self.encoder.conv_in = wider
        groups = int(self.encoder.config.norm_num_groups)
        widths = [int(block.resnets[-1].out_channels) for block in self.encoder.down_blocks]
        widths.append(int(self.encoder.mid_block.resnets[-1].out_channels))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(min(groups, width), width), nn.SiLU(), nn.Conv2d(width, 1, kernel_size=1))
            for width in widths)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, noise: Optional[torch.Tensor],
                encoder_hidden_states: torch.Tensor, added_cond_kwargs: Optional[dict[str, Any]] = None
                ) -> list[torch.Tensor]:
        """One logit map (B, 1, h_k, w_k) per scale: after each down block and after the mid block."""
        unet = self.encoder
        if self.condition_on_noise:
            if noise is None:
                raise ValueError("this discriminator is conditioned on the generator's noise z: pass it")
            x_t = torch.cat([x_t, noise.to(x_t.dtype)], dim=1)
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=timesteps))
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs or {})
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(x_t)
        features = []
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, _ = block(hidden_states=hidden, temb=emb)
            features.append(hidden)
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = unet.mid_block(hidden, emb)
        features.append(hidden)
        return [head(feature) for head, feature in zip(self.heads, features)]
