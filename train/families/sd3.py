"""Stable Diffusion 3 / 3.5: an MMDiT transformer (`SD3Transformer2DModel`) trained by flow matching, conditioned on
CLIP-L + OpenCLIP-G (penultimate hidden states, concatenated and zero-padded to T5's width, then T5-XXL's tokens
after them in the sequence) and on the two CLIPs' pooled projections, concatenated.

The parameterisation is the scheduler's (train/schedule.py): x_t = (1 - sigma) x_0 + sigma eps, the transformer
predicts v = eps - x_0 and is called with the time sigma * 1000, sigma after SD3's static shift (3.0). A pipeline
saved without T5 (`text_encoder_3: null`, a documented way to run SD3 in less memory) gets T5's part as zeros, as
diffusers' pipeline does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from addpipe.train.families.base import ModelFamily, freeze, load_vae_and_scheduler

T5_TOKENS = 256
"""T5's sequence length: diffusers' StableDiffusion3Pipeline default (max_sequence_length)."""


class StableDiffusion3(ModelFamily):
    name = "sd3"
    summary = ("SD3/SD3.5: MMDiT transformer, flow matching (static shift), CLIP-L + OpenCLIP-G (penultimate hidden "
               "states; pooled: both projections) + T5 tokens")
    denoiser_folder = "transformer"
    optional_text_encoders = frozenset({"text_encoder_3"})
    lora = False  # the adapters' export (transformer_lora_layers) is not written yet: full students only

    def matches(self, index: dict[str, Any]) -> bool:
        return "transformer" in index and ("text_encoder_3" in index
                                           or str(index.get("_class_name", "")).startswith("StableDiffusion3"))

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def text_encoders(self) -> list[tuple[str, type]]:
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return [("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                ("text_encoder_3", T5EncoderModel)]

    def load(self, model_config, dtype: torch.dtype, with_denoiser: bool = True):
        from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTokenizer, T5TokenizerFast

        from addpipe.train.models import TeacherComponents, check_tokenizer, load_pretrained

        name, revision = model_config.teacher, model_config.revision
        common = {"revision": revision, "variant": model_config.variant}
        transformer_class = self.denoiser_class()
        transformer = (load_pretrained(transformer_class, name, self.denoiser_folder, torch_dtype=dtype, **common)
                       if with_denoiser else None)
        joint = (transformer.config if transformer is not None
                 else transformer_class.load_config(name, subfolder=self.denoiser_folder, revision=revision))
        vae, scheduler_config = load_vae_and_scheduler(model_config, dtype, FlowMatchEulerDiscreteScheduler)
        index = DiffusionPipeline.load_config(name, revision=revision)
        with_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        tokenizers, text_encoders = [], []
        for position, (sub, cls) in enumerate(self.text_encoders()):
            if sub == "text_encoder_3" and not with_t5:
                continue
            folder = "tokenizer" if position == 0 else f"tokenizer_{position + 1}"
            tokenizer = load_pretrained(T5TokenizerFast if sub == "text_encoder_3" else CLIPTokenizer, name, folder,
                                        revision=revision)
            check_tokenizer(tokenizer, f"{name}/{folder}")
            tokenizers.append(tokenizer)
            text_encoders.append(load_pretrained(cls, name, sub, torch_dtype=dtype, **common))
        freeze(transformer, vae, *text_encoders)
        return TeacherComponents(self.name, transformer, vae, text_encoders, tokenizers, scheduler_config, name,
                                 extra={"joint_attention_dim": int(joint["joint_attention_dim"])})

    def pooled_width(self, encoders: list[tuple[type, Any]]) -> int:
        from transformers import CLIPTextModelWithProjection

        return sum(config.projection_dim for cls, config in encoders if issubclass(cls, CLIPTextModelWithProjection))

    def token_width(self, denoiser_config: dict[str, Any]) -> int:
        return int(denoiser_config["joint_attention_dim"])

    def token_dim(self, components) -> int:
        return components.extra["joint_attention_dim"]  # known without the transformer (loaded to encode data only)

    def encode(self, components, prompts: list[str], device):
        from addpipe.train.models import TextConditioning

        hidden, pooled = [], []
        for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2]):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if len(components.text_encoders) > 2:
            ids = components.tokenizers[2](prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                           add_special_tokens=True, return_tensors="pt").input_ids.to(device)
            t5 = components.text_encoders[2](ids)[0].to(clip.dtype)
        else:  # no T5 in this pipeline: zeros in its place, as diffusers' pipeline gives
            t5 = clip.new_zeros(len(prompts), T5_TOKENS, self.token_dim(components))
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextConditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def denoise(self, model: Callable, x, t, conditioning, micro=None, dtype=None) -> torch.Tensor:
        cast = (lambda v: v) if dtype is None else (lambda v: v.to(dtype))
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cast(conditioning.hidden_states),
                     pooled_projections=cast(conditioning.pooled), return_dict=False)[0]

    def pipeline(self, components, scheduler, denoiser: Optional[nn.Module] = None):
        encoders, tokenizers = components.text_encoders, components.tokenizers
        return self.pipeline_class()(
            transformer=denoiser if denoiser is not None else components.unet, scheduler=scheduler, vae=components.vae,
            text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
            text_encoder_3=encoders[2] if len(encoders) > 2 else None,
            tokenizer_3=tokenizers[2] if len(tokenizers) > 2 else None)

    def pipeline_embeddings(self, text, negative, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        return {"prompt_embeds": text.hidden_states.to(dtype), "negative_prompt_embeds": negative.hidden_states.to(dtype),
                "pooled_prompt_embeds": text.pooled.to(dtype), "negative_pooled_prompt_embeds": negative.pooled.to(dtype)}

    def planning_inputs(self, denoiser_config: dict[str, Any], batch: int, latent_size: int, dtype: torch.dtype):
        x = torch.empty(batch, denoiser_config["in_channels"], latent_size, latent_size, device="meta", dtype=dtype)
        tokens = 77 + T5_TOKENS
        return x, {"encoder_hidden_states": torch.empty(batch, tokens, denoiser_config["joint_attention_dim"],
                                                        device="meta", dtype=dtype),
                   "pooled_projections": torch.empty(batch, denoiser_config["pooled_projection_dim"], device="meta",
                                                     dtype=dtype)}

    def planning_output(self, model: Callable, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return model(hidden_states=x, timestep=torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), **kwargs,
                     return_dict=False)[0]
