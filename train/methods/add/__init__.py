"""Adversarial Diffusion Distillation (Sauer et al. 2023): config.py its sections, discriminator.py the DINOv2
heads, augment.py DiffAugment, memory.py its memory plan, method.py the method. Importing this registers it."""

from addpipe.train.methods import register
from addpipe.train.methods.add.method import ADD

register(ADD)

__all__ = ["ADD"]
