"""The UNet families: Stable Diffusion 1.x/2.x (one CLIP text encoder) and SDXL (two, a pooled embedding and
size/crop micro-conditioning), both `UNet2DConditionModel` denoisers with ε or v prediction."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from addpipe.train.families.base import ModelFamily, freeze, load_vae_and_scheduler


class StableDiffusion(ModelFamily):
    name = "sd"
    summary = "SD 1.x/2.x: UNet, one CLIP text encoder (last hidden state; pooled: its EOS token)"

    def matches(self, index: dict[str, Any]) -> bool:
        return "unet" in index and "text_encoder" in index and "text_encoder_2" not in index

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def text_encoders(self) -> list[tuple[str, type]]:
        from transformers import CLIPTextModel

        return [("text_encoder", CLIPTextModel)]

    def load(self, model_config, dtype: torch.dtype, with_denoiser: bool = True):
        from diffusers import DDPMScheduler
        from transformers import CLIPTokenizer

        from addpipe.train.models import TeacherComponents, check_tokenizer, load_pretrained

        name, revision = model_config.teacher, model_config.revision
        common = {"revision": revision, "variant": model_config.variant}
        unet = (load_pretrained(self.denoiser_class(), name, self.denoiser_folder, torch_dtype=dtype, **common)
                if with_denoiser else None)
        vae, scheduler_config = load_vae_and_scheduler(model_config, dtype, DDPMScheduler)
        tokenizers, text_encoders = [], []
        for index, (sub, cls) in enumerate(self.text_encoders()):
            tokenizer_folder = "tokenizer" if index == 0 else f"tokenizer_{index + 1}"
            tokenizer = load_pretrained(CLIPTokenizer, name, tokenizer_folder, revision=revision)
            check_tokenizer(tokenizer, f"{name}/{tokenizer_folder}")
            tokenizers.append(tokenizer)
            text_encoders.append(load_pretrained(cls, name, sub, torch_dtype=dtype, **common))
        freeze(unet, vae, *text_encoders)
        return TeacherComponents(self.name, unet, vae, text_encoders, tokenizers, scheduler_config, name,
                                 zero_unconditional=self.zero_unconditional(name, revision))

    def zero_unconditional(self, name: str, revision: Optional[str]) -> bool:
        """Whether the guidance branch is all-zero embeddings rather than the encoding of "" (SD: never)."""
        return False

    def _hidden_and_pooled(self, encoder, output) -> tuple[torch.Tensor, torch.Tensor]:
        return output.last_hidden_state, output.pooler_output

    def encode(self, components, prompts: list[str], device):
        from addpipe.train.models import TextConditioning

        hidden_parts, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            hidden, pooled = self._hidden_and_pooled(encoder, encoder(ids, output_hidden_states=True))
            hidden_parts.append(hidden)
        return TextConditioning(torch.cat(hidden_parts, dim=-1), pooled)

    def unconditional(self, components, device):
        from addpipe.train.models import TextConditioning

        empty = self.encode(components, [""], device)
        if components.zero_unconditional:
            return TextConditioning(torch.zeros_like(empty.hidden_states), torch.zeros_like(empty.pooled))
        return empty

    def denoise(self, model: Callable, x, t, conditioning, micro=None, dtype=None) -> torch.Tensor:
        return model(x, t, **conditioning.unet_kwargs(micro, dtype), return_dict=False)[0]

    def pipeline(self, components, scheduler, denoiser: Optional[nn.Module] = None):
        return self.pipeline_class()(vae=components.vae, text_encoder=components.text_encoders[0],
                                     tokenizer=components.tokenizers[0],
                                     unet=denoiser if denoiser is not None else components.unet, scheduler=scheduler,
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def pipeline_embeddings(self, text, negative, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        return {"prompt_embeds": text.hidden_states.to(dtype), "negative_prompt_embeds": negative.hidden_states.to(dtype)}

    def planning_inputs(self, denoiser_config: dict[str, Any], batch: int, latent_size: int, dtype: torch.dtype):
        x = torch.empty(batch, denoiser_config["in_channels"], latent_size, latent_size, device="meta", dtype=dtype)
        return x, {"encoder_hidden_states": torch.empty(batch, 77, denoiser_config["cross_attention_dim"], device="meta",
                                                         dtype=dtype)}


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    summary = ("SDXL: UNet, CLIP-L + OpenCLIP-G (penultimate hidden states; pooled: the second's projection), "
               "size/crop micro-conditioning")

    def matches(self, index: dict[str, Any]) -> bool:
        return "unet" in index and "text_encoder_2" in index

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def text_encoders(self) -> list[tuple[str, type]]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]

    def zero_unconditional(self, name: str, revision: Optional[str]) -> bool:
        from addpipe.train.models import forces_zeros

        return forces_zeros(name, revision)

    def _hidden_and_pooled(self, encoder, output):
        from transformers import CLIPTextModelWithProjection

        pooled = output.text_embeds if isinstance(encoder, CLIPTextModelWithProjection) else output.pooler_output
        return output.hidden_states[-2], pooled

    def micro_conditioning(self, n: int, resolution: int, original_sizes=None, crops=None) -> torch.Tensor:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
        if original_sizes is None:
            original_sizes = torch.full((n, 2), resolution)
        if crops is None:
            crops = torch.zeros(n, 2, dtype=original_sizes.dtype)
        target = torch.tensor([resolution, resolution], dtype=original_sizes.dtype).expand(n, 2)
        return torch.cat([original_sizes, crops.to(original_sizes.device), target.to(original_sizes.device)], dim=1).float()

    def pipeline(self, components, scheduler, denoiser: Optional[nn.Module] = None):
        return self.pipeline_class()(vae=components.vae, text_encoder=components.text_encoders[0],
                                     tokenizer=components.tokenizers[0], text_encoder_2=components.text_encoders[1],
                                     tokenizer_2=components.tokenizers[1],
                                     unet=denoiser if denoiser is not None else components.unet, scheduler=scheduler)

    def pipeline_embeddings(self, text, negative, resolution: int, dtype: torch.dtype) -> dict[str, Any]:
        return {**super().pipeline_embeddings(text, negative, resolution, dtype),
                "pooled_prompt_embeds": text.pooled.to(dtype), "negative_pooled_prompt_embeds": negative.pooled.to(dtype),
                "original_size": (resolution, resolution), "target_size": (resolution, resolution)}

    def planning_inputs(self, denoiser_config: dict[str, Any], batch: int, latent_size: int, dtype: torch.dtype):
        x, kwargs = super().planning_inputs(denoiser_config, batch, latent_size, dtype)
        text_embeds = (denoiser_config.get("projection_class_embeddings_input_dim", 2816)
                       - 6 * denoiser_config.get("addition_time_embed_dim", 256))
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text_embeds, device="meta", dtype=dtype),
                                       "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype)}
        return x, kwargs
