"""Export the student as a complete diffusers pipeline directory (its family's pipeline class loads it:
StableDiffusion(XL)Pipeline, StableDiffusion3Pipeline).

For a UNet student the scheduler is diffusers' LCMScheduler configured for the student: trailing timesteps, zero
terminal SNR, the student's prediction type. Its step is ADD's sampler (predict x0, re-noise with fresh noise),
so `pipe(prompt, timesteps=[999], guidance_scale=0)` is a one-step ADD sample. A flow-matching student keeps the
teacher's FlowMatchEulerDiscreteScheduler with stochastic sampling: `pipe(prompt, sigmas=[1.0], guidance_scale=0)`
(addpipe_student.json's pipeline_sigmas for more steps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from addpipe.train import distributed
from addpipe.train.models import TeacherComponents, diffusers_pipeline
from addpipe.train.sampling import STUDENT_INFO
from addpipe.train.schedule import is_flow_matching


def student_scheduler(components: TeacherComponents, prediction_type: str, zero_terminal_snr: bool):
    """LCMScheduler for a DDPM-style student; for a flow-matching one, the teacher's FlowMatchEulerDiscreteScheduler
    (its shift kept) with stochastic sampling, whose step is the same sampler: x0 = x - sigma*v, then
    (1 - sigma') x0 + sigma' * fresh noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if is_flow_matching(components.scheduler_config):
        return FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config, stochastic_sampling=True)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    base = {k: components.scheduler_config[k] for k in keys if k in components.scheduler_config}
    return LCMScheduler(**base, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr,
                        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
                        original_inference_steps=4, steps_offset=1)


def student_info(components: TeacherComponents, prediction_type: str, zero_terminal_snr: bool,
                 timesteps: Sequence[int]) -> dict[str, Any]:
    """addpipe_student.json: how the student was trained and how to sample it. A flow-matching student also gets its
    sigmas and what to pass as `sigmas=` to its diffusers pipeline, which shifts them itself: (t + 1) / T."""
    steps = int(components.scheduler_config["num_train_timesteps"])
    info = {"architecture": components.architecture, "prediction_type": prediction_type,
            "zero_terminal_snr": zero_terminal_snr, "timesteps": list(timesteps), "num_train_timesteps": steps,
            "teacher": components.source}
    if is_flow_matching(components.scheduler_config):
        from addpipe.train.schedule import flow_schedule

        sigmas = flow_schedule(components.scheduler_config).sigmas
        info["sigmas"] = [round(float(sigmas[t]), 6) for t in timesteps]
        info["pipeline_sigmas"] = [(t + 1) / steps for t in timesteps]
    return info


def export_student(state: Optional[dict[str, torch.Tensor]], unet_config: Any, components: TeacherComponents, out_dir: Path,
                   prediction_type: str, zero_terminal_snr: bool, timesteps: Sequence[int]) -> Path:
    """`state`: the student's whole state dict on rank 0 (a backend's full_state_dict); rank 0 writes, all wait."""
    if distributed.is_main():
        unet = components.family.denoiser_class().from_config(unet_config)
        unet.load_state_dict(state)
        pipeline = diffusers_pipeline(components, student_scheduler(components, prediction_type, zero_terminal_snr), unet)
        out_dir = Path(out_dir)
        pipeline.save_pretrained(out_dir)
        info = student_info(components, prediction_type, zero_terminal_snr, timesteps)
        (out_dir / STUDENT_INFO).write_text(json.dumps(info, indent=2))
    distributed.barrier()
    return Path(out_dir)


def export_lora_student(state: Optional[dict[str, torch.Tensor]], unet_config: Any, lora_config: Any,
                        components: TeacherComponents, lora_dir: Path, fused_dir: Optional[Path], prediction_type: str,
                        zero_terminal_snr: bool, timesteps: Sequence[int]) -> Path:
    """A LoRA student: `lora_dir` gets the adapters in diffusers' LoRA format (pytorch_lora_weights.safetensors, read
    by `pipe.load_lora_weights`, with the adapter config as its metadata), the student's scheduler (`scheduler/`,
    for the trained timesteps) and student_info.json naming the base model; `fused_dir`, when given, the full
    pipeline with the adapters merged into the UNet. Returns the fused pipeline's directory, else the LoRA's."""
    from addpipe.train.lora import adapter_metadata, split_state

    fused_state = None
    if distributed.is_main():
        lora, fused_state = split_state(state, unet_config, lora_config)
        lora_dir = Path(lora_dir)
        lora_dir.mkdir(parents=True, exist_ok=True)
        loader = components.family.pipeline_class()
        metadata = adapter_metadata(lora_config)
        loader.save_lora_weights(lora_dir, unet_lora_layers=lora, unet_lora_adapter_metadata=metadata)
        student_scheduler(components, prediction_type, zero_terminal_snr).save_pretrained(lora_dir / "scheduler")
        info = {**student_info(components, prediction_type, zero_terminal_snr, timesteps),
                "base_model": components.source, "lora": metadata}
        (lora_dir / STUDENT_INFO).write_text(json.dumps(info, indent=2))
    distributed.barrier()
    if fused_dir is None:
        return Path(lora_dir)
    return export_student(fused_state, unet_config, components, fused_dir, prediction_type, zero_terminal_snr, timesteps)
