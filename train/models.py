"""Loading the teacher's components and turning prompts into its denoiser's conditioning, through its model family
(train/families/: SD- and SDXL-style UNets built in).

Everything loads through `from_pretrained` from a hub id or a local diffusers-format directory, the
way users point at `stabilityai/sdxl-turbo`-style repositories; tests point it at tiny random-init
directories they write themselves.
"""

from __future__ import annotations

import contextlib

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

# diffusers must be imported before deepspeed.zero.Init ever runs (docs/engineering.md).
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from addpipe.assets import looks_local  # noqa: F401 - also this module's public name
from addpipe.errors import UserError

MIN_TOKENIZER_VOCAB = 1000


class ModelLoadError(UserError, RuntimeError):
    """A model directory or hub id that cannot be loaded, with what was tried."""


def missing_directory(name: str, needed_for: str) -> "ModelLoadError":
    return ModelLoadError(f"directory not found: {name} (needed for {needed_for}; a hub id is `owner/name`)")


def load_pretrained(cls, name: str, subfolder: Optional[str] = None, **kwargs):
    """`cls.from_pretrained` with errors that name the path and the component."""
    component = f"{name}/{subfolder}" if subfolder else name
    if looks_local(name):
        path = Path(os.path.expanduser(name))
        target = path / subfolder if subfolder else path
        if not target.exists():
            raise missing_directory(str(target), cls.__name__)
        name = str(path)
    if subfolder:
        kwargs["subfolder"] = subfolder
    if "torch_dtype" in kwargs and cls.__module__.startswith("transformers"):
        kwargs["dtype"] = kwargs.pop("torch_dtype")  # transformers >= 4.56 spells it dtype
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        hint = " (the hub is unreachable when HF_HUB_OFFLINE=1; pass a local directory)" if not looks_local(name) else ""
        raise ModelLoadError(f"could not load {cls.__name__} from {component}{hint}: {error}") from error


def read_model_index(teacher: str, revision: Optional[str] = None) -> dict[str, Any]:
    """The pipeline's model_index.json, from a local directory or the hub."""
    if looks_local(teacher):
        if not os.path.isdir(os.path.expanduser(teacher)):
            raise missing_directory(teacher, "the teacher pipeline")
        index_path = Path(os.path.expanduser(teacher)) / "model_index.json"
        if not index_path.is_file():
            raise ModelLoadError(f"{index_path} not found: {teacher} is not a diffusers pipeline directory")
        return json.loads(index_path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(teacher, "model_index.json", revision=revision)).read_text())
    except Exception as error:  # network, auth and missing-file errors all mean the same here
        raise ModelLoadError(f"could not read model_index.json of {teacher}: {error}") from error


def detect_architecture(teacher: str, revision: Optional[str] = None) -> str:
    """The name of the model family (train/families/) the pipeline belongs to, from its model_index.json."""
    from addpipe.train.families import family_of_index

    try:
        return family_of_index(read_model_index(teacher, revision), teacher).name
    except ValueError as error:
        raise ModelLoadError(str(error)) from None


def resolve_architecture(model_config) -> str:
    """`model.architecture`, or the detected family where it says auto."""
    if model_config.architecture != "auto":
        return model_config.architecture
    return detect_architecture(model_config.teacher, model_config.revision)


def check_tokenizer(tokenizer, where: str) -> None:
    # Offline with no cache, CLIPTokenizer.from_pretrained can silently return a 2-token vocabulary.
    if len(tokenizer) < MIN_TOKENIZER_VOCAB:
        why = ("the hub is unreachable and nothing is cached (HF_HUB_OFFLINE=1?): pass a local directory"
               if not looks_local(where) else "its vocab.json/merges.txt are missing")
        raise ModelLoadError(f"tokenizer from {where} has only {len(tokenizer)} tokens; {why}")


@dataclass
class TeacherComponents:
    """The frozen networks and settings of a text-to-image diffusion pipeline."""

    architecture: str
    unet: Optional[UNet2DConditionModel]  # None when loaded only to encode data (prep encode)
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    zero_unconditional: bool = False
    """The unconditional (guidance) branch is all-zero embeddings, not the encoding of "": what diffusers' SDXL
    pipeline does for an empty negative prompt (model_index.json's force_zeros_for_empty_prompt, default true),
    and so what an SDXL teacher's guidance was used with."""

    @property
    def family(self):
        """The model family (train/families/) that loaded these components and knows how to run them."""
        from addpipe.train.families import family

        return family(self.architecture)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text embedding (the discriminator's text condition), as the family builds it."""
        return self.family.pooled_dim(self)

    def text_embedding_dim(self, kind: str) -> int:
        """Width of TextConditioning.discriminator_embedding(kind)."""
        return self.pooled_dim if kind == "pooled" else self.family.token_dim(self)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]


def load_teacher(model_config, dtype: torch.dtype = torch.float32, with_unet: bool = True) -> TeacherComponents:
    """The teacher's frozen components, loaded by its model family (`model.architecture`, or found from the
    directory)."""
    from addpipe.train.families import family

    return family(resolve_architecture(model_config)).load(model_config, dtype, with_denoiser=with_unet)


def diffusers_pipeline(components: TeacherComponents, scheduler, unet: Optional[nn.Module] = None):
    """`components` as their family's diffusers pipeline, with `unet` in place of theirs when given: what exports
    save and what the ODE pairs are sampled with."""
    return components.family.pipeline(components, scheduler, unet)


def forces_zeros(name: str, revision: Optional[str]) -> bool:
    """model_index.json's force_zeros_for_empty_prompt; true where the file does not say (SDXL's default)."""
    from diffusers import DiffusionPipeline

    try:
        return bool(DiffusionPipeline.load_config(name, revision=revision).get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError):  # a directory without model_index.json (components assembled by hand)
        return True


def make_student(teacher: TeacherComponents, model_config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The student starts as a trainable copy of the teacher's denoiser (initialisation is crucial, docs/method.md)."""
    if model_config.student_init:
        student = load_pretrained(teacher.family.denoiser_class(), model_config.student_init, torch_dtype=dtype)
    else:
        student = copy.deepcopy(teacher.unet)
        if next(student.parameters()).dtype != dtype:
            student = student.to(dtype)
    student.requires_grad_(True)
    student.train()
    if model_config.gradient_checkpointing is True:  # "auto" is decided by the trainer before this
        student.enable_gradient_checkpointing()
    return student


@dataclass
class TextConditioning:
    """What a UNet needs besides the noisy input, plus the pooled embedding for the discriminator."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor

    def unet_kwargs(self, time_ids: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
        """The UNet's keyword inputs; cast to `dtype` where given."""
        cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))
        kwargs: dict[str, Any] = {"encoder_hidden_states": cast(self.hidden_states)}
        if time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cast(self.pooled), "time_ids": cast(time_ids)}
        return kwargs

    def discriminator_embedding(self, kind: str) -> torch.Tensor:
        """The discriminator's text condition: the pooled embedding, or the mean of the UNet's text tokens."""
        return self.pooled if kind == "pooled" else self.hidden_states.float().mean(dim=1)

    def select(self, index: torch.Tensor | slice) -> "TextConditioning":
        return TextConditioning(self.hidden_states[index], self.pooled[index])

    @staticmethod
    def cat(items: list["TextConditioning"]) -> "TextConditioning":
        return TextConditioning(torch.cat([i.hidden_states for i in items]), torch.cat([i.pooled for i in items]))


def encode_prompts(teacher: TeacherComponents, prompts: list[str], device: torch.device | str,
                   grad: bool = False) -> TextConditioning:
    """The text conditioning the teacher's family makes of `prompts` (train/families/). Without gradients unless
    `grad` (only teacher pretraining trains a text encoder)."""
    with torch.set_grad_enabled(grad):
        return teacher.family.encode(teacher, prompts, device)


def clip_text_config(name: str):
    """The CLIPTextConfig of a CLIP text model with projection, or of a whole CLIP model's repository (laion's
    ViT-g-14 is one), which keeps the projection width at the top of its config, outside text_config, whose own
    default (512) would not fit the projection's weights."""
    from transformers import CLIPTextConfig

    config = load_pretrained(CLIPTextConfig, name)
    top, _ = CLIPTextConfig.get_config_dict(str(Path(os.path.expanduser(name))) if looks_local(name) else name)
    if top.get("model_type") == "clip" and "projection_dim" in top:
        config.projection_dim = top["projection_dim"]
    return config


class TextEmbedder:
    """A frozen CLIP text model with projection: captions -> its projected (pooled) embedding, the discriminator's
    c_text when `discriminator.text_encoder` names one."""

    def __init__(self, name: str, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.tokenizer = load_pretrained(CLIPTokenizer, name)
        check_tokenizer(self.tokenizer, name)
        self.model = load_pretrained(CLIPTextModelWithProjection, name, config=clip_text_config(name),
                                     torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.model(ids).text_embeds.float()


def unconditional(teacher: TeacherComponents, device: torch.device | str) -> TextConditioning:
    """The teacher's unconditional branch for classifier-free guidance, as its family defines it (zeros for SDXL
    where model_index.json forces them, the encoding of the empty prompt for SD)."""
    with torch.no_grad():
        return teacher.family.unconditional(teacher, device)


def needs_upcast(vae: nn.Module, dtype: torch.dtype) -> bool:
    """A VAE that declares `force_upcast` (the original SDXL VAE: its decoder's activations overflow fp16 into NaNs)
    must run in fp32 where the run would use fp16; diffusers' own pipelines do the same. bf16 has fp32's range."""
    return dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


@contextlib.contextmanager
def _vae_precision(vae: nn.Module, device: torch.device):
    """Inside: the VAE runs at its own weights' dtype, with an fp16 autocast around it switched off when the VAE
    asks to be upcast (under autocast its convolutions would run in fp16 whatever its weights are)."""
    dtype = next(vae.parameters()).dtype
    fp16_autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    if needs_upcast(vae, dtype):  # fp16 weights handed to us: upcast once, before this forward
        vae.to(torch.float32)
        dtype = torch.float32
    if needs_upcast(vae, torch.float16 if fp16_autocast else dtype):
        with torch.autocast(device.type, enabled=False):
            yield torch.float32
    else:
        yield dtype


def vae_encode(teacher: TeacherComponents, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents. The posterior mean keeps the encoding deterministic."""
    with _vae_precision(teacher.vae, pixels.device) as dtype:
        latents = teacher.vae.encode(pixels.to(dtype)).latent_dist.mean
    return ((latents.float() - teacher.latent_shift) * teacher.latent_scale).float()


def vae_decode(teacher: TeacherComponents, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in about [-1, 1]; undoing the scaling factor first (a known defect otherwise)."""
    latents = latents / teacher.latent_scale + teacher.latent_shift
    with _vae_precision(teacher.vae, latents.device) as dtype:
        return teacher.vae.decode(latents.to(dtype)).sample.float()
