"""Diffusion2GAN (Kang et al. 2024): config.py its sections, pairs.py its ODE pairs (`addpipe pairs`), data.py the
pairs' sample format, latent_lpips.py and perceptual.py E-LatentLPIPS, unet_discriminator.py the teacher-encoder
discriminator, memory.py its memory plan, method.py the method. Importing this registers it."""

from addpipe.train.methods import register
from addpipe.train.methods.diffusion2gan.method import Diffusion2GAN

register(Diffusion2GAN)

__all__ = ["Diffusion2GAN"]
