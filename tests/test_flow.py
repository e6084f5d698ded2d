"""Flow-matching teachers (SD3/SD3.5) through the family seam: the shifted sigma grid and the velocity
parameterisation against hand-written formulas and diffusers' own scheduler; the text conditioning equal to
diffusers' StableDiffusion3Pipeline (with and without T5); a tiny SD3 teacher distilled with ADD by the unchanged
loop on both backends, resumed exactly; the export loaded by StableDiffusion3Pipeline sampling what addpipe samples."""

from __future__ import annotations

import json
import math

import pytest
import torch

from addpipe.config import load
from addpipe.train.config import TrainConfig
from addpipe.train.schedule import (diffusion_target, flow_schedule, predicted_eps, predicted_x0, schedule_from_config,
                                    shift_sigmas)
from conftest import TINY_CONFIG, run_cli, tiny_overrides

SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}


def test_the_shifted_sigma_grid_is_sd3s_and_fluxs_and_the_one_diffusers_samples_on():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = flow_schedule(SD3_SCHEDULER)
    for t in (0, 249, 499, 749, 999):
        s = (t + 1) / 1000
        assert schedule.sigmas[t].item() == pytest.approx(3 * s / (1 + 2 * s), abs=1e-7)
        assert schedule.alphas[t].item() == pytest.approx(1 - 3 * s / (1 + 2 * s), abs=1e-7)
        assert schedule.model_time(torch.tensor([t])).item() == pytest.approx(3000 * s / (1 + 2 * s), abs=1e-3)
    assert schedule.sigmas[999].item() == 1.0 and schedule.alphas[999].item() == 0.0  # pure noise, by construction
    assert torch.all(schedule.sigmas[1:] > schedule.sigmas[:-1])
    # what the exported pipeline's scheduler makes of addpipe_student.json's pipeline_sigmas
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    trained = [999, 749, 499, 249]
    scheduler.set_timesteps(sigmas=[(t + 1) / 1000 for t in trained])
    assert torch.allclose(scheduler.sigmas[:-1], schedule.sigmas[trained], atol=1e-6)
    assert torch.allclose(scheduler.timesteps, schedule.model_time(torch.tensor(trained)), atol=1e-3)
    assert schedule.sigmas[trained].tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5], abs=1e-6)

    # FLUX.1: mu linear in the image's tokens; sigma' = e^mu / (e^mu + 1/sigma - 1)
    tokens = 1024  # 1024 px: (1024/8/2)^2 / 4... a 64 x 64 latent packed 2 x 2 = 1024 tokens
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    s = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(shift_sigmas(s, FLUX_SCHEDULER, tokens), math.exp(mu) / (math.exp(mu) + 1 / s - 1))
    flux = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    flux.set_timesteps(sigmas=[1.0, 0.5], mu=mu)
    assert torch.allclose(flux.sigmas[:-1].double(), flow_schedule(FLUX_SCHEDULER, tokens).sigmas[[999, 499]].double(),
                          atol=1e-6)
    with pytest.raises(ValueError, match="token count"):
        flow_schedule(FLUX_SCHEDULER)


def test_velocity_gives_x0_and_eps_back_and_is_what_the_network_learns():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    schedule = schedule_from_config(SD3_SCHEDULER, zero_terminal_snr=False, prediction_type="epsilon")  # ignored
    assert schedule.prediction_type == "flow"
    t = torch.tensor([0, 500, 999])
    alpha, sigma = schedule.at(t, 4)
    x_t = (1 - sigma) * x0 + sigma * eps
    v = diffusion_target(x0, eps, alpha, sigma, "flow")
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(predicted_x0(v, x_t, alpha, sigma, "flow"), x0, atol=1e-5)
    assert torch.allclose(predicted_eps(v, x_t, alpha, sigma, "flow")[:2], eps[:2], atol=1e-5)


def test_sd3_text_conditioning_is_the_diffusers_pipelines_with_and_without_t5(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from addpipe.train.config import ModelConfig
    from addpipe.train.models import encode_prompts, load_teacher, unconditional
    from addpipe.train.tiny import build_tiny_sd3_pipeline

    prompts = ["a red digit seven", "zero on blue"]
    for directory in (tiny_sd3, build_tiny_sd3_pipeline(tmp_path / "no_t5", with_t5=False)):
        components = load_teacher(ModelConfig(teacher=str(directory)))
        assert components.architecture == "sd3"
        ours = encode_prompts(components, prompts, "cpu")
        without_t5 = {} if components.text_encoders[2:] else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(directory, **without_t5)  # how diffusers runs SD3 without T5
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                                           do_classifier_free_guidance=True)
        assert torch.equal(ours.hidden_states, embeds) and torch.equal(ours.pooled, pooled)
        empty = unconditional(components, "cpu")
        # a batch of one against a batch of two: equal up to the matmuls' blocking
        torch.testing.assert_close(empty.hidden_states[0], negative[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(empty.pooled[0], negative_pooled[0], atol=1e-6, rtol=1e-5)
        assert components.pooled_dim == pooled.shape[-1] and components.text_embedding_dim("mean") == embeds.shape[-1]


def sd3_overrides(tiny_sd3, tiny_dino, digit_shards, run, **extra):
    return tiny_overrides(tiny_sd3, tiny_dino, digit_shards, run, **{"student.num_timesteps": 2, **extra})


@pytest.mark.slow
def test_an_sd3_teacher_distils_with_add_resumes_exactly_and_exports_a_pipeline_that_samples_as_addpipe_does(
        tiny_sd3, tiny_dino, digit_shards, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from addpipe.train.loop import train
    from addpipe.train.models import encode_prompts, load_teacher, make_student
    from addpipe.train.sampling import load_student, sample_latents

    def config(run, steps, backend="deepspeed"):
        return load(TrainConfig, TINY_CONFIG, sd3_overrides(tiny_sd3, tiny_dino, digit_shards, run, steps=steps,
                                                             **{"engine.backend": backend, "checkpoint.every": 2}))

    # the student at initialisation: the teacher's own x0 at the first sigma (pure noise in, x0 = x - 1 * v)
    cfg = config(tmp_path / "unused", 1)
    teacher = load_teacher(cfg.model)
    student = make_student(teacher, cfg.model)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    conditioning = encode_prompts(teacher, ["one", "two"], "cpu")
    schedule = schedule_from_config(teacher.scheduler_config, True)
    time = schedule.model_time(torch.tensor([999, 999]))
    with torch.no_grad():
        ours = noise - teacher.family.denoise(student, noise, time, conditioning)
        theirs = noise - teacher.family.denoise(teacher.unet, noise, time, conditioning)
    assert torch.equal(ours, theirs)

    for backend in ("deepspeed",):  # both backends, one and two ranks: tests/test_distributed.py
        whole = tmp_path / backend / "whole"
        out = train(config(whole, 4, backend))
        lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3, 4]
        assert all(math.isfinite(line["loss/generator_adversarial"]) for line in lines)
        resumed = tmp_path / backend / "resumed"
        train(config(resumed, 2, backend))
        train(config(resumed, 4, backend), resume=True)
        a = StableDiffusion3Pipeline.from_pretrained(out).transformer.state_dict()
        b = StableDiffusion3Pipeline.from_pretrained(resumed / "student").transformer.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        before = teacher.unet.state_dict()
        assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained

    info = json.loads((out / "addpipe_student.json").read_text())
    assert info["architecture"] == "sd3" and info["prediction_type"] == "flow" and info["timesteps"] == [999, 499]
    assert info["sigmas"] == pytest.approx([1.0, 0.75]) and info["pipeline_sigmas"] == [1.0, 0.5]
    components, schedule, _ = load_student(str(out), torch.device("cpu"))
    prompts = ["a red digit seven"]
    conditioning = encode_prompts(components, prompts, "cpu")
    ours = sample_latents(components.family.denoiser(components.unet, conditioning), schedule, noise[:1], [999])
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    with torch.no_grad():
        theirs = pipe(prompts, sigmas=info["pipeline_sigmas"][:1], guidance_scale=0.0, latents=noise[:1],
                      output_type="latent", height=16, width=16).images
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()  # both in the scaled latent space

    sampled = run_cli("sample", "--student", out, "--prompt", "a red digit seven", "--out", tmp_path / "grid.png",
                      "--steps", "2")
    assert sampled.returncode == 0, sampled.stderr[-3000:]


def test_a_transformer_teacher_of_an_unsupported_kind_is_refused_naming_the_supported_ones(tmp_path):
    from addpipe.train.models import ModelLoadError, detect_architecture

    flux = tmp_path / "flux_like"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(ModelLoadError, match="no model family recognises this pipeline .*class FluxPipeline.*"
                                             "known families: sd, .*sd3, sdxl"):
        detect_architecture(str(flux))
