"""Diffusion2GAN's own config sections: its ODE pairs (`addpipe pairs`) and its losses and discriminator.

Each field's docstring is read back by `addpipe.config` for `--dry-run` and for the error that lists valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from addpipe.train.config import TrainConfig

@dataclass
class PairsConfig:
    """Diffusion2GAN's ODE pairs (`addpipe pairs`): the teacher's deterministic sampler run from stored noise."""

    sampler: Literal["ddim"] = "ddim"
    """The teacher's ODE solver: DDIM with eta 0 (deterministic: the same noise and prompt give the same latent)."""
    steps: int = 50
    """Sampler steps (timestep spacing as the teacher's scheduler config says)."""
    guidance: float = 8.0
    """Classifier-free guidance scale, fixed for the whole set (the paper's SD 1.5 set: 8, 'SD-CFG-8'). The
    one-step student learns this guidance and only this one."""
    prompt_column: str = "caption"
    """Column of the prompt table holding the prompts (a .txt file: one prompt per line)."""
    samples_per_shard: int = 1000
    """Pairs per output shard; the shard is also the unit of resuming and of splitting across ranks and array tasks."""
    batch_size: int = 8
    """Prompts sampled together."""
    seed: int = 0
    """Noise of prompt i is drawn from a generator seeded with (seed, i): any rank, task or rerun draws the same."""

    def __post_init__(self) -> None:
        for key, value, low in (("pairs.steps", self.steps, 1), ("pairs.samples_per_shard", self.samples_per_shard, 1),
                                ("pairs.batch_size", self.batch_size, 1), ("pairs.guidance", self.guidance, 0)):
            if value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")


@dataclass
class D2GConfig:
    """Diffusion2GAN (method: diffusion2gan): a one-step generator regressed onto ODE pairs with E-LatentLPIPS, plus
    a conditional GAN whose discriminator is the teacher UNet's encoder."""

    lpips: str = ""
    """LatentLPIPS weights: a published <encoder>_latest_vgg16_tuned.pth, or one `addpipe demo` trains (required)."""
    augment: str = "bg"
    """E-LatentLPIPS augmentations, letters of b (flips, quarter turns, shifts), g (scale, rotation, anisotropy),
    c (brightness, contrast), o (cutout); empty: plain LatentLPIPS."""
    lpips_weight: float = 1.0
    """Weight of the E-LatentLPIPS regression term."""
    adversarial: bool = True
    """Train the conditional GAN; false: the regression-only ablation (no discriminator)."""
    gan_weight: float = 0.05
    """Weight of the generator's GAN term against the regression term."""
    discriminator_t: tuple[int, int] = (10, 500)
    """Range of the timestep both real and generated latents are noised to before the discriminator (a diffusion GAN)."""
    text_mismatch_weight: float = 1.0
    """Weight of the text-alignment term: real latents with another sample's prompt count as fake."""
    r1_gamma: float = 1.0
    """gamma of R1 = gamma/2 E||dD(x_t)/dx_t||^2 on the noised real latents (0: off)."""

    def __post_init__(self) -> None:
        self.discriminator_t = tuple(int(t) for t in self.discriminator_t)
        if len(self.discriminator_t) != 2 or not 0 <= self.discriminator_t[0] <= self.discriminator_t[1]:
            raise ValueError(f"d2g.discriminator_t must be [low, high] with 0 <= low <= high, got {self.discriminator_t}")
        for key in ("lpips_weight", "gan_weight", "text_mismatch_weight", "r1_gamma"):
            if getattr(self, key) < 0:
                raise ValueError(f"d2g.{key} must be >= 0, got {getattr(self, key)}")


@dataclass
class Diffusion2GANConfig(TrainConfig):
    """method: diffusion2gan."""

    pairs: PairsConfig = field(default_factory=PairsConfig)
    """ODE pairs for Diffusion2GAN (`addpipe pairs`)."""
    d2g: D2GConfig = field(default_factory=D2GConfig)
    """Diffusion2GAN's losses and discriminator."""
