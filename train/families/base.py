"""The model-family seam: what the methods, the sampler, the export and the memory plan need from a kind of
text-to-image diffusion model, so that none of them branches on which kind it is.

A family says how its pipeline directory is recognised (model_index.json), how its components load, how prompts
become the denoiser's text conditioning, which extra per-sample conditioning it takes (SDXL's size and crop ids),
how its denoiser is called on a batch, which diffusers pipeline class the export writes and loads, and what its
denoiser's inputs look like for the memory plan. The built-in families are UNet ones (unet.py: SD 1.x/2.x and
SDXL); another registers itself (train/families/__init__.py) and is chosen by `model.architecture: <name>` or
found from the directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from addpipe.train.models import TeacherComponents, TextConditioning

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t, timesteps) -> the denoiser's raw output (ε, v or x0, as the schedule's prediction type says)."""


class ModelFamily(ABC):
    """One kind of text-to-image diffusion model. `name` is what `model.architecture` says."""

    name: str = ""
    summary: str = ""
    """One line for --dry-run and errors, e.g. 'SDXL: UNet, CLIP-L + OpenCLIP-G, size/crop micro-conditioning'."""
    denoiser_folder: str = "unet"
    """The pipeline's subfolder holding the denoiser."""

    @abstractmethod
    def matches(self, index: dict[str, Any]) -> bool:
        """Whether a pipeline with this model_index.json belongs to the family."""

    @abstractmethod
    def denoiser_class(self) -> type[nn.Module]:
        """The diffusers class of the denoiser (its from_pretrained, from_config and save_pretrained are used)."""

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class an exported student is written as and loads with."""

    @abstractmethod
    def load(self, model_config, dtype: torch.dtype, with_denoiser: bool = True) -> "TeacherComponents":
        """The frozen components (denoiser, VAE, text encoders, tokenizers, scheduler config) through from_pretrained."""

    @abstractmethod
    def encode(self, components: "TeacherComponents", prompts: list[str], device) -> "TextConditioning":
        """Prompts -> the denoiser's text conditioning and the pooled embedding (the discriminator's text condition)."""

    def unconditional(self, components: "TeacherComponents", device) -> "TextConditioning":
        """The unconditional branch of classifier-free guidance: by default the encoding of the empty prompt."""
        return self.encode(components, [""], device)

    def micro_conditioning(self, n: int, resolution: int, original_sizes: Optional[torch.Tensor] = None,
                           crops: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Per-sample conditioning besides the text (SDXL's size and crop ids), or None for a family without any.
        Without sizes and crops: whole, uncropped images at `resolution` (what sampling asks for)."""
        return None

    @abstractmethod
    def denoise(self, model: Callable, x: torch.Tensor, t: torch.Tensor, conditioning: "TextConditioning",
                micro: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The denoiser's raw output on a batch. `model` is the module or a backend's forward; `dtype`, when given,
        is what the conditioning is cast to (a bf16 engine wants its inputs in its weights' dtype)."""

    def denoiser(self, model: Callable, conditioning: "TextConditioning", micro: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> Denoiser:
        """`model` bound to one batch's conditioning: what the sampler steps."""
        return lambda x, t: self.denoise(model, x, t, conditioning, micro, dtype)

    lora: bool = True
    """Whether LoRA students (train/lora.py) are supported for the family."""
    optional_text_encoders: frozenset[str] = frozenset()
    """Subfolders of text encoders a pipeline may leave out (SD3's T5); the rest must be there."""

    def pooled_width(self, encoders: list[tuple[type, Any]]) -> int:
        """Width of the pooled text embedding from the text encoders' (class, config): by default the last one's
        projection (or hidden) width."""
        from transformers import CLIPTextModelWithProjection

        cls, config = encoders[-1]
        return config.projection_dim if issubclass(cls, CLIPTextModelWithProjection) else config.hidden_size

    def pooled_dim(self, components: "TeacherComponents") -> int:
        """Width of the pooled text embedding of loaded components."""
        return self.pooled_width([(type(e), e.config) for e in components.text_encoders])

    def planning_output(self, model: Callable, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """One forward of the denoiser on planning_inputs' meta tensors (a UNet takes the timestep second)."""
        return model(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), **kwargs, return_dict=False)[0]

    def token_width(self, denoiser_config: dict[str, Any]) -> int:
        """Width of the denoiser's text tokens from its config (a UNet's cross_attention_dim)."""
        return int(denoiser_config["cross_attention_dim"])

    def token_dim(self, components: "TeacherComponents") -> int:
        """Width of the denoiser's text tokens of loaded components."""
        return self.token_width(components.unet.config)

    @abstractmethod
    def pipeline(self, components: "TeacherComponents", scheduler, denoiser: Optional[nn.Module] = None):
        """`components` as the family's diffusers pipeline, with `denoiser` in place of the teacher's when given."""

    @abstractmethod
    def pipeline_embeddings(self, text: "TextConditioning", negative: "TextConditioning", resolution: int,
                            dtype: torch.dtype) -> dict[str, Any]:
        """The family pipeline's keyword inputs for precomputed prompt and negative-prompt embeddings (and whole,
        uncropped images at `resolution` where it takes sizes): how `addpipe pairs` samples the teacher."""

    @abstractmethod
    def text_encoders(self) -> list[tuple[str, type]]:
        """(subfolder, transformers class) of each text encoder, for the memory plan."""

    @abstractmethod
    def planning_inputs(self, denoiser_config: dict[str, Any], batch: int, latent_size: int,
                        dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
        """The denoiser's latent input and keyword inputs at `batch` x `latent_size`², as meta tensors (the memory
        plan counts one forward on them)."""


def load_vae_and_scheduler(model_config, dtype: torch.dtype, scheduler_class: type) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher's VAE (or model.vae's), held in fp32 where it must be upcast, and its raw scheduler config (the
    class, prediction type, shift and zero-SNR flag as the authors wrote them): what every family loads alike."""
    from diffusers import AutoencoderKL

    from addpipe.train.models import ModelLoadError, load_pretrained, needs_upcast

    name, revision = model_config.teacher, model_config.revision
    vae = (load_pretrained(AutoencoderKL, model_config.vae, torch_dtype=dtype) if model_config.vae
           else load_pretrained(AutoencoderKL, name, "vae", torch_dtype=dtype, revision=revision,
                                variant=model_config.variant))
    if needs_upcast(vae, dtype):  # held in fp32 from the start: switching dtypes between a forward and its backward is not safe
        vae.to(torch.float32)
    try:
        scheduler_config = dict(scheduler_class.load_config(name, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not read the scheduler config of {name}: {error}") from error
    return vae, scheduler_config


def freeze(*modules: Optional[nn.Module]) -> None:
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
