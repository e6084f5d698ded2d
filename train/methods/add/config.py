"""ADD's own config sections: the discriminator (frozen feature network + heads) and the distillation loss.

Each field's docstring is read back by `addpipe.config` for `--dry-run` and for the error that lists valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from addpipe.assets import ASSET_MODEL
from addpipe.train.config import TrainConfig

DEFAULT_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, low-resolution"
)


AUGMENT_POLICIES = ("color", "translation", "cutout")


@dataclass
class DiscriminatorConfig:
    feature_network: str = field(default="facebook/dinov2-small", metadata=ASSET_MODEL)
    """Hub id or local directory of the frozen DINOv2 ViT (transformers) whose tokens the heads read."""
    image_encoder: Optional[str] = field(default=None, metadata=ASSET_MODEL)
    """DINOv2 for the image condition c_img (CLS of the real image); default: the feature network itself."""
    num_heads: int = 5
    """Number of heads, on evenly spaced transformer layers (StyleGAN-T uses 5)."""
    layers: tuple[int, ...] = ()
    """Explicit 1-based transformer layer indices for the heads instead of evenly spaced ones."""
    input_size: int = 224
    """Images are resized to this square size (a multiple of the ViT patch size) before the feature network."""
    projection_dim: int = 64
    """Width of the conditioning projection (StyleGAN-T's cmap_dim)."""
    kernel_size: int = 9
    """Kernel of the heads' 1-D convolutions over the token sequence."""
    virtual_batch_size: int = 8
    """Group size of the heads' local batch norm; without normalisation the heads did not learn (docs/method.md)."""
    text_conditioning: bool = True
    """Project the text embedding into the heads' output."""
    text_encoder: Optional[str] = field(default=None, metadata=ASSET_MODEL)
    """Hub id or local directory of a CLIP text model with projection (transformers CLIPTextModelWithProjection and
    its tokenizer) whose projected embedding of the caption is c_text. The paper uses CLIP ViT-g-14
    (laion/CLIP-ViT-g-14-laion2B-s12B-b42K); unset, c_text comes from the teacher's own text encoders
    (`text_embedding`)."""
    text_embedding: Literal["pooled", "mean"] = "pooled"
    """The text condition: the pooled embedding (CLIP's EOS token, as the paper), or the mean of the hidden states the UNet cross-attends to (for text encoders whose EOS token carries little content)."""
    image_conditioning: bool = True
    """Project the DINOv2 CLS embedding of the real image into the heads' output."""
    image_condition_pure_noise: bool = True
    """Keep c_img for samples whose student input held no trace of x_0 (alpha_s = 0: the pure-noise timestep at zero
    terminal SNR), as the paper does. False gives those samples, real and fake alike, a zero c_img, in case asking the
    student to match an image it never saw pulls it toward an average; on the demo it did not help (add_sweep.md)."""
    r1_gamma: float = 1e-2
    """Weight of R1: gamma/2 times the squared gradient norm of each head's summed token logits w.r.t. that head's
    input features, per head scaled by 257/tokens (the same strength per token at any input size) and, with
    r1_normalise, taken w.r.t. the features divided by their RMS (train/losses.py r1_penalty; docs/method.md says
    how the default was measured)."""
    r1_normalise: bool = True
    """Take R1 w.r.t. each sample's features divided by their root mean square, so gamma does not depend on the
    feature network's scale (at the paper's gamma on DINOv2's raw features R1 was 1e-4 of the hinge or less)."""
    spectral_norm: bool = True
    """Spectral normalisation of the heads' convolutions (StyleGAN-T's heads, which ADD's follow); neutral on the
    demo (one-step FID 70.0 against 70.4 without), kept for the design source's stability at scale."""
    augment: str = ""
    """Differentiable augmentation (DiffAugment) of real and generated images before the feature network, as
    StyleGAN-T trains: comma-separated of color, translation, cutout ('color,translation,cutout' is StyleGAN-T's);
    '' for none, the default: on the demo it cost 3 FID at every step count (docs/method.md). For small datasets,
    where the heads can memorise the real images."""

    def __post_init__(self) -> None:
        if self.num_heads < 1 and not self.layers:
            raise ValueError(f"discriminator.num_heads must be at least 1, got {self.num_heads}")
        for key, low in (("projection_dim", 1), ("kernel_size", 1), ("virtual_batch_size", 1), ("input_size", 14)):
            if getattr(self, key) < low:
                raise ValueError(f"discriminator.{key} must be >= {low}, got {getattr(self, key)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"discriminator.kernel_size must be odd (the token sequence keeps its length), got "
                             f"{self.kernel_size}")
        if self.r1_gamma < 0:
            raise ValueError(f"discriminator.r1_gamma must be >= 0, got {self.r1_gamma}")
        unknown = [p.strip() for p in self.augment.split(",") if p.strip() and p.strip() not in AUGMENT_POLICIES]
        if unknown:
            raise ValueError(f"discriminator.augment: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(AUGMENT_POLICIES)} (comma-separated), or '' for none")


@dataclass
class DistillConfig:
    weighting: Literal["exponential", "sds", "nfsd"] = "nfsd"
    """c(t): exponential = alpha_t; sds = alpha_t/(2 sigma_t) * sigma_t^2; nfsd = noise-free score distillation with the SDS weight."""
    space: Literal["auto", "latent", "pixel"] = "auto"
    """Compare student and teacher x0 in latent space or in pixel space after VAE decoding (more stable for a teacher
    x0 target). auto: pixel for exponential and sds, latent for nfsd, whose target x_hat - (sigma/alpha) g is a
    displaced latent that leaves the VAE decoder's domain at large t (sigma/alpha = 13 at t = 980 on SD/SDXL's
    betas); NFSD in pixel space is refused. Either way the squared error is averaged over the elements of each
    sample, so lambda weighs the same per-element error at every resolution (compare the terms' gradient norms in
    the log, grad_norm/*, to see what that means for the balance)."""
    weight: float = 2.5
    """lambda: L = L_adv + lambda * L_distill, L_distill a per-element mean (see `space`)."""
    teacher_guidance: float = 7.5
    """Classifier-free guidance scale of the teacher target (1 = no guidance)."""
    t_min: int = 20
    """Smallest teacher timestep t for re-noising the student sample."""
    t_max: int = 980
    """Largest teacher timestep t."""
    nfsd_negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """NFSD's negative prompt for the domain term at large t."""
    nfsd_t_threshold: int = 200
    """NFSD uses the unconditional prediction alone below this t, minus the negative-prompt one above it."""
    adversarial: bool = True
    """Include the adversarial loss (turn off for the distillation-only ablation)."""
    distillation: bool = True
    """Include the distillation loss (turn off for the adversarial-only ablation)."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"distill.weight (lambda) must be >= 0, got {self.weight}")
        if self.teacher_guidance < 0:
            raise ValueError(f"distill.teacher_guidance must be >= 0 (1 = no guidance), got {self.teacher_guidance}")
        if not 0 <= self.nfsd_t_threshold:
            raise ValueError(f"distill.nfsd_t_threshold must be >= 0, got {self.nfsd_t_threshold}")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 <= distill.t_min < distill.t_max, got {self.t_min}, {self.t_max}")
        if self.weighting == "nfsd" and self.space == "pixel":
            raise ValueError("distill.space=pixel with distill.weighting=nfsd: NFSD's target x_hat - (sigma/alpha) g is a "
                             "latent displaced by up to 13x the noise scale (t = 980 on SD/SDXL's betas), which the VAE "
                             "decoder cannot decode faithfully; its gradient is exact in latent space over the whole t "
                             "range. Use distill.space=latent (or auto)")
        if not (self.adversarial or self.distillation):
            raise ValueError("at least one of distill.adversarial and distill.distillation must be on")

    @property
    def resolved_space(self) -> str:
        """Where the distillation loss is taken: `space`, with auto resolved by the weighting."""
        if self.space != "auto":
            return self.space
        return "latent" if self.weighting == "nfsd" else "pixel"


@dataclass
class ADDConfig(TrainConfig):
    """method: add."""

    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """Frozen feature network and trainable heads."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Score distillation loss."""
