"""The trainer end to end on tiny random-init models saved to temporary directories."""

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from addpipe.config import load
from addpipe.train.config import TrainConfig
from conftest import REPO, TINY_CONFIG, tiny_overrides, run_cli

LOSS_TERMS = ["loss/generator_adversarial", "loss/distillation", "loss/discriminator_real", "loss/discriminator_fake",
              "loss/r1", "lr/student", "lr/discriminator", "perf/images_per_second"]


def clean_env():
    """In-process trainers set the rendezvous variables; a child process must pick its own."""
    import os

    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def cli(*args, check=True, cwd=None):
    result = subprocess.run([sys.executable, "-m", "addpipe.pipeline", *args], capture_output=True, text=True,
                            env=clean_env(), cwd=cwd)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def unet_weights(student_dir):
    return load_file(str(next((student_dir / "unet").glob("*.safetensors"))))


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["sd", "sdxl"])
def test_cli_trains_exports_and_diffusers_loads(architecture, request, tiny_dino, digit_shards, tmp_path):
    teacher = request.getfixturevalue(f"tiny_{architecture}")
    run = tmp_path / "run"
    result = cli("train", "-c", str(TINY_CONFIG), "--zero", "2",
                 *tiny_overrides(teacher, tiny_dino, digit_shards, run, steps=3, **{"log.sample_every": 2,
                                                                                  "log.progress": "true"}))
    # not a terminal (a batch job's log): plain progress lines, no progress bar's carriage returns
    assert "\r" not in result.stderr and "ADD step 3/3: " in result.stderr, result.stderr[-2000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for term in LOSS_TERMS:
        assert all(term in line and line[term] == line[term] for line in lines), term
    assert (run / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    assert (run / "samples" / "step_00000002.png").is_file() and (run / "config.yaml").is_file()

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(run / "student")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    images = pipe("a handwritten seven", timesteps=[999, 499], guidance_scale=0.0, height=16, width=16,
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3) and (images == images).all()

    # One diffusers step from the same noise equals our sampler's one step.
    from addpipe.train.sampling import load_student, sample_latents
    from addpipe.train.models import encode_prompts

    components, schedule, info = load_student(str(run / "student"), torch.device("cpu"))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    # SDXL's micro-conditioning written out: original 16x16, no crop, target 16x16
    ours_kwargs = encode_prompts(components, ["a red two"], "cpu").unet_kwargs(
        torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]) if architecture == "sdxl" else None)
    ours = sample_latents(lambda x, t: components.unet(x, t, **ours_kwargs, return_dict=False)[0], schedule, noise, [999])
    theirs = pipe("a red two", timesteps=[999], guidance_scale=0.0, height=16, width=16, latents=noise.clone(),
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)

    # The docs' snippet, exactly as written but for the path, loads this student (SD or SDXL) and draws one step.
    snippet = docs_python_block("evaluation.md", "exported student also loads in diffusers directly")
    assert '"runs/x/student"' in snippet and '"fox.png"' in snippet
    exec(snippet.replace('"runs/x/student"', repr(str(run / "student"))).replace('"fox.png"', repr(str(tmp_path / "fox.png"))), {})
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert Image.open(tmp_path / "fox.png").size == (size, size)


def docs_python_block(page: str, after: str) -> str:
    """The first ```python block of docs/`page` after the sentence `after`."""
    text = (REPO / "docs" / page).read_text()
    start = text.index(after)
    return text[text.index("```python\n", start) + len("```python\n"): text.index("```", text.index("```python\n", start) + 9)]


def test_resume_equals_uninterrupted(tiny_sd, tiny_dino, digit_shards, tmp_path):
    from addpipe.train.loop import train

    def config(run, steps):
        return load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=steps,
                                                             **{"optim.ema_decay": 0.9,
                                                                "student.backward_simulation": 0.5}))

    whole = train(config(tmp_path / "whole", 4))
    train(config(tmp_path / "split", 2))
    split = train(config(tmp_path / "split", 4), resume=True)
    a, b = unet_weights(whole), unet_weights(split)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    from addpipe.train.checkpoint import read_tensors

    heads = [read_tensors(p / "checkpoints/step_00000004", "discriminator.") for p in (tmp_path / "whole", tmp_path / "split")]
    assert heads[0] and all(key.startswith(("discriminator.model.heads", "discriminator.optim.heads")) for key in heads[0])
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], atol=1e-5, rtol=1e-4, msg=key)
    whole_metrics = (tmp_path / "whole/metrics.jsonl").read_text().splitlines()
    split_metrics = (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["loss/distillation"] for l in whole_metrics] == pytest.approx(
        [json.loads(l)["loss/distillation"] for l in split_metrics], rel=1e-4)


def test_image_condition_is_zeroed_where_the_student_saw_only_noise(tiny_sd, tiny_dino, digit_shards, tmp_path):
    """discriminator.image_condition_pure_noise=false: the samples at the pure-noise timestep (alpha = 0 at zero
    terminal SNR) get a zero c_img on the real and the fake side; every other sample keeps its own."""
    from addpipe.train.loop import Trainer
    from addpipe.train.schedule import draw_training_noise

    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
        tiny_sd, tiny_dino, digit_shards, tmp_path, steps=1,
        **{"engine.zero": 0, "data.batch_size": 6, "discriminator.image_condition_pure_noise": "false",
           "student.prediction_type": "v_prediction", "student.zero_terminal_snr": "true",
           "student.change_parameterisation": "true"})))
    inputs = trainer.method.prepare(next(trainer.data))
    noise = draw_training_noise(0, 0, inputs.streams, tuple(inputs.latents.shape[1:]), 4, 20, 980)
    noise.student_index = torch.tensor([0, 1, 2, 3, 0, 1])
    assert trainer.method.student_schedule.alphas[trainer.method.timesteps[0]] == 0 < trainer.method.student_schedule.alphas[trainer.method.timesteps[1]]
    out = trainer.method.blind_image_condition(inputs, noise)
    for row in range(6):
        for name in ("image_embedding", "source_embedding"):
            value, before = getattr(out, name)[row], getattr(inputs, name)[row]
            assert torch.equal(value, torch.zeros_like(before) if row in (0, 4) else before), (name, row)
    assert bool(inputs.image_embedding[0].abs().sum() > 0)

    trainer.config.discriminator.image_condition_pure_noise = True
    assert trainer.method.blind_image_condition(inputs, noise) is inputs


def test_backward_simulation_feeds_the_students_own_samples(tiny_sd, tiny_dino, digit_shards, tmp_path):
    """Chosen samples at tau_k start from the x0 the sampler reaches after k student steps (written out by hand
    here for a v-prediction student), and the discriminator's image condition follows them; the rest keep
    their real latents."""
    from addpipe.train.loop import Trainer
    from addpipe.train.models import vae_decode
    from addpipe.train.schedule import draw_training_noise

    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
        tiny_sd, tiny_dino, digit_shards, tmp_path, steps=1,
        **{"engine.zero": 0, "student.backward_simulation": 0.5, "data.batch_size": 6,
           "student.prediction_type": "v_prediction", "student.zero_terminal_snr": "true",
           "student.change_parameterisation": "true"})))  # not the teacher's
    inputs = trainer.method.prepare(next(trainer.data))
    noise = draw_training_noise(0, 0, inputs.streams, tuple(inputs.latents.shape[1:]), 4, 20, 980)
    noise.student_index = torch.tensor([0, 1, 2, 3, 3, 0])
    noise.simulate = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.1])  # row 4 is not chosen (0.9 >= 0.5)
    out = trainer.method.simulate(inputs, noise)

    schedule, student = trainer.method.student_schedule, trainer.method.student.module
    assert schedule.prediction_type == "v_prediction" and trainer.method.timesteps == [999, 749, 499, 249]
    for row in range(6):
        if row in (0, 4, 5):
            assert torch.equal(out.sources[row], inputs.latents[row])
            assert torch.equal(out.source_embedding[row], inputs.image_embedding[row])
            continue
        cond = inputs.conditioning.select([row])
        x = noise.simulation_noise[row:row + 1, 0]
        with torch.no_grad():
            for k in range(int(noise.student_index[row])):
                t = trainer.method.timesteps[k]
                v = student(x, torch.tensor([t]), **cond.unet_kwargs(None), return_dict=False)[0]
                x0 = schedule.alphas[t] * x - schedule.sigmas[t] * v
                if k + 1 < int(noise.student_index[row]):
                    t_next = trainer.method.timesteps[k + 1]
                    x = schedule.alphas[t_next] * x0 + schedule.sigmas[t_next] * noise.simulation_noise[row:row + 1, k + 1]
            embedding = trainer.method.discriminator.module.image_embedding(vae_decode(trainer.method.teacher, x0).clamp(-1, 1))
        torch.testing.assert_close(out.sources[row:row + 1], x0, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.source_embedding[row:row + 1], embedding, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(out.sources[row], inputs.latents[row])
    assert torch.equal(out.latents, inputs.latents) and torch.equal(out.image_embedding, inputs.image_embedding)

    trainer.config.student.backward_simulation = 0.0
    assert trainer.method.simulate(inputs, noise) is inputs
    with pytest.raises(ValueError, match="backward_simulation"):
        load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path,
                                                      **{"student.backward_simulation": 1.5}))


def test_discriminator_text_condition_can_be_the_mean_of_the_unets_text_tokens(tiny_sdxl, tiny_dino, digit_shards,
                                                                                 tmp_path):
    """text_embedding=mean: the heads read the mean of the (two-encoder) hidden states the UNet cross-attends to,
    whose width differs from the pooled embedding's, and a step trains on it."""
    from addpipe.train.loop import Trainer

    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
        tiny_sdxl, tiny_dino, digit_shards, tmp_path, steps=1,
        **{"engine.zero": 0, "discriminator.text_embedding": "mean"})))
    inputs = trainer.method.prepare(next(trainer.data))
    torch.testing.assert_close(trainer.method.text_condition(inputs), inputs.conditioning.hidden_states.mean(dim=1))
    width = trainer.method.teacher.unet.config.cross_attention_dim
    assert width != trainer.method.teacher.pooled_dim
    image_width = trainer.method.discriminator.module.feature_network.config.hidden_size
    assert all(head.project_condition.in_features == width + image_width for head in trainer.method.discriminator.module.heads)
    heads_before = [p.detach().clone() for p in trainer.method.heads]
    trainer.run()
    assert any(not torch.equal(b, p) for b, p in zip(heads_before, trainer.method.heads))


def test_frozen_networks_get_no_gradient_and_student_moves(tiny_sd, tiny_dino, digit_shards, tmp_path):
    from addpipe.train.loop import Trainer

    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path, steps=1,
                                                                    **{"engine.zero": 0})))
    frozen = {name: [p.detach().clone() for p in module.parameters()]
              for name, module in [("teacher", trainer.method.teacher.unet), ("vae", trainer.method.teacher.vae),
                                   ("text", trainer.method.teacher.text_encoders[0]),
                                   ("dino", trainer.method.discriminator.module.feature_network)]}
    student_before = [p.detach().clone() for p in trainer.method.student.module.parameters()]
    heads_before = [p.detach().clone() for p in trainer.method.heads]
    trainer.run()
    for name, module in [("teacher", trainer.method.teacher.unet), ("vae", trainer.method.teacher.vae),
                         ("text", trainer.method.teacher.text_encoders[0]), ("dino", trainer.method.discriminator.module.feature_network)]:
        for before, param in zip(frozen[name], module.parameters()):
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(before, param), name
    assert not trainer.method.discriminator.module.feature_network.training
    assert any(not torch.equal(b, p) for b, p in zip(student_before, trainer.method.student.module.parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(heads_before, trainer.method.heads))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_training_on_a_gpu(zero, tiny_sdxl, tiny_dino, digit_shards, tmp_path):
    """bf16 on CUDA. DeepSpeed turns torch.autocast off inside its engine's forward there (not on CPU), so the
    student's fp32 inputs met bf16 weights; and ZeRO-3 replaced F.linear process-wide with a version that ignored
    autocast. Both only showed on a GPU."""
    from addpipe.train.loop import Trainer

    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
        tiny_sdxl, tiny_dino, digit_shards, tmp_path, steps=2,
        **{"engine.zero": zero, "engine.precision": "bf16", "model.gradient_checkpointing": "true"})))
    assert trainer.device.type == "cuda" and trainer.dtype == torch.bfloat16
    student = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r[term]) for r in records for term in LOSS_TERMS)
    before, after = unet_weights(tiny_sdxl), unet_weights(student)
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)


@pytest.mark.parametrize("weighting", ["exponential", "sds"])
def test_zero_terminal_snr_v_teacher_distils_at_its_last_timestep(weighting, tiny_dino, digit_shards, tmp_path):
    """A v-prediction teacher on a zero-terminal-SNR schedule (the demo's; SD 2.1-style models retrained per
    Lin et al.) re-noised right up to t = T-1 (alpha = 0): its guided target must stay finite there, where
    converting through eps divides by alpha. The non-finite-loss guard would stop the run otherwise."""
    from addpipe.train.loop import Trainer
    from addpipe.train.tiny import build_tiny_pipeline

    teacher = build_tiny_pipeline(tmp_path / "teacher", "sd", prediction_type="v_prediction", zero_terminal_snr=True,
                                  cross_attention_levels=(True, True))
    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(
        teacher, tiny_dino, digit_shards, tmp_path / "run", steps=2, **{"engine.zero": 0, "distill.t_min": 998,
                                                                          "distill.t_max": 999,
                                                                          "distill.weighting": weighting})))
    assert trainer.method.teacher_schedule.alphas[-1].item() == 0.0 and trainer.method.teacher_schedule.prediction_type == "v_prediction"
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isfinite(line["loss/distillation"]) for line in lines)
    # NFSD's target has sigma/alpha in it: refused up front with the reason, not a NaN a hundred steps in
    with pytest.raises(ValueError, match="t_max=999 is pure noise"):
        Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(teacher, tiny_dino, digit_shards, tmp_path / "nfsd", steps=1,
                                                              **{"distill.t_max": 999, "distill.weighting": "nfsd",
                                                                 "distill.space": "latent"})))


def test_tiny_pipeline_options_reach_the_saved_models(tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from addpipe.train.schedule import student_timesteps
    from addpipe.train.tiny import build_tiny_pipeline

    directory = build_tiny_pipeline(tmp_path / "t", "sd", prediction_type="v_prediction", zero_terminal_snr=True,
                                    cross_attention_levels=(True, True), text_layers=3)
    unet = UNet2DConditionModel.from_pretrained(directory / "unet")
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert json.loads((directory / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 3
    scheduler = DDIMScheduler.from_pretrained(directory / "scheduler")
    scheduler.set_timesteps(4)  # a guided teacher samples from pure noise on the student's own timesteps
    assert scheduler.timesteps.tolist() == student_timesteps(4) and scheduler.alphas_cumprod[-1].item() < 1e-12
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        build_tiny_pipeline(tmp_path / "e", "sd", prediction_type="epsilon", zero_terminal_snr=True)


@pytest.mark.parametrize("log_every, poisoned_step", [(1, 3), (5, 2)])
def test_non_finite_loss_stops_and_keeps_last_checkpoint(log_every, poisoned_step, tiny_sd, tiny_dino, digit_shards,
                                                         tmp_path):
    """The check runs at every log flush and before every checkpoint (no host synchronisation per step): with a log
    window of 5 the NaN of the 3rd step is found before the 4th step's checkpoint, which is never written."""
    from addpipe.train.loop import Trainer
    from addpipe.train.report import NonFiniteLossError

    trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path, steps=6,
                                                                    **{"checkpoint.every": 2, "log.every": log_every})))
    prepare = trainer.method.prepare

    def poisoned(batch):  # a corrupted batch makes every loss NaN
        inputs = prepare(batch)
        if trainer.step == poisoned_step:
            inputs.latents.fill_(float("nan"))
        return inputs

    trainer.method.prepare = poisoned
    # the step counted from 1, as metrics are
    with pytest.raises(NonFiniteLossError, match=rf"step {poisoned_step + 1} \(.*loss/distillation=nan.*step_00000002"):
        trainer.run()
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000002"
    assert not (tmp_path / "checkpoints/step_00000004").exists() and not (tmp_path / "student").exists()


def test_an_epsilon_teacher_gives_an_epsilon_student_whose_first_step_is_the_teachers_x0(tiny_sd, tiny_dino,
                                                                                        digit_shards, tmp_path):
    """By default the student keeps the teacher's parameterisation and betas (SDXL-Turbo: epsilon, trailing, no
    rescale), so at initialisation its one step from pure noise at 999 is the teacher's own x0 there; the exported
    scheduler is that schedule. A v student on a zero-terminal-SNR schedule (the old default) is not: its x0 at 999
    is minus its output."""
    from diffusers import DDPMScheduler, LCMScheduler

    from addpipe.train.loop import Trainer
    from addpipe.train.models import encode_prompts
    from addpipe.train.sampling import sample_latents

    teacher_scheduler = DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    alpha_bar = teacher_scheduler.alphas_cumprod[999].item()
    assert teacher_scheduler.config.prediction_type == "epsilon" and 0 < alpha_bar < 0.01  # small, not zero

    def one_step(**extra):
        trainer = Trainer(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards,
                                                                        tmp_path / str(len(extra)), steps=1, **extra)))
        method = trainer.method
        cond = encode_prompts(method.teacher, ["a handwritten seven in red"], "cpu").unet_kwargs(None)
        noise = torch.randn((1, *method.latent_shape), generator=torch.Generator().manual_seed(3))
        x0 = sample_latents(lambda x, t: method.student.module(x, t, **cond, return_dict=False)[0], method.student_schedule,
                            noise, [999])
        with torch.no_grad():
            eps = method.teacher.unet(noise, torch.tensor([999]), **cond, return_dict=False)[0]
        return trainer, x0, (noise - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5

    trainer, student_x0, teacher_x0 = one_step()
    method = trainer.method
    assert (method.student_prediction, method.student_zero_snr) == ("epsilon", False)
    torch.testing.assert_close(method.student_schedule.alphas[999] ** 2, torch.tensor(alpha_bar), rtol=1e-5, atol=0)
    torch.testing.assert_close(student_x0, teacher_x0, rtol=1e-4, atol=1e-4)
    trainer.run()
    exported = LCMScheduler.from_pretrained(tmp_path / "0" / "student", subfolder="scheduler")
    assert exported.config.prediction_type == "epsilon" and not exported.config.rescale_betas_zero_snr
    assert exported.config.timestep_spacing == "trailing"
    torch.testing.assert_close(exported.alphas_cumprod, teacher_scheduler.alphas_cumprod)
    info = json.loads((tmp_path / "0" / "student" / "addpipe_student.json").read_text())
    assert (info["prediction_type"], info["zero_terminal_snr"]) == ("epsilon", False)

    v_student = {"student.prediction_type": "v_prediction", "student.zero_terminal_snr": "true"}
    with pytest.raises(ValueError, match="student.prediction_type v_prediction \\(the teacher's: epsilon\\); "
                                         "student.zero_terminal_snr True .*student.change_parameterisation=true"):
        one_step(**v_student)  # an explicit override alone is not enough: it must be acknowledged
    _, v_x0, teacher_x0 = one_step(**v_student, **{"student.change_parameterisation": "true"})
    assert (v_x0 - teacher_x0).abs().mean() > 0.5 * teacher_x0.abs().mean()

    with pytest.raises(ValueError, match="epsilon has no x0 where alpha = 0.*v_prediction"):
        one_step(**{"student.zero_terminal_snr": "true"})


def test_sample_cli_is_deterministic_on_the_trained_timesteps(tiny_sd, tiny_dino, digit_shards, tmp_path):
    """Custom student.timesteps are what sampling uses (from the exported metadata), a step count with no subset of
    them is refused unless asked for, and a seed gives the same image."""
    from typer.testing import CliRunner

    from addpipe.pipeline.cli import app
    from addpipe.train.loop import train

    run = tmp_path / "run"
    train(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=1,
                                                        **{"student.timesteps": "[999,600,300]"})))
    assert json.loads((run / "student" / "addpipe_student.json").read_text())["timesteps"] == [999, 600, 300]
    outputs = []
    for seed, name in [(0, "a.png"), (0, "b.png"), (1, "c.png")]:  # in this process: the command, not its start-up
        done = CliRunner().invoke(app, ["sample", "--student", str(run / "student"), "--prompt", "a red fox in snow",
                                        "--steps", "3", "--seed", str(seed), "--out", str(tmp_path / name)])
        assert done.exit_code == 0 and "timesteps [999, 600, 300]" in done.output, done.output
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    with Image.open(tmp_path / "a.png") as labelled:  # the prompt above, steps and seed beside, 16 px upscaled to 256
        assert labelled.size == (150 + 256 + 4, 56 + 256 + 4)
    plain = CliRunner().invoke(app, ["sample", "--student", str(run / "student"), "--prompt", "a", "--prompt", "b",
                                     "--steps", "3", "--plain", "--out", str(tmp_path / "plain.png")])
    assert plain.exit_code == 0, plain.output
    with Image.open(tmp_path / "plain.png") as bare:  # two 16 px images with save_grid's 2 px padding
        assert bare.size == (2 + 2 * (16 + 2), 2 + 16 + 2)
    bad = run_cli("sample", "--student", str(run / "student"), "--prompt", "x", "--steps", "2")
    assert bad.returncode == 2 and "trained on timesteps [999, 600, 300]: it samples with [1, 3] step(s)" in bad.stderr
    assert "--untrained-steps" in bad.stderr and "Traceback" not in bad.stderr
    from addpipe.train.sampling import sample_timesteps

    info = json.loads((run / "student" / "addpipe_student.json").read_text())
    for steps in (9, 0):
        with pytest.raises(ValueError, match=r"it samples with \[1, 3\] step"):
            sample_timesteps(info, steps)
    asked = CliRunner().invoke(app, ["sample", "--student", str(run / "student"), "--prompt", "x", "--steps", "2",
                                     "--untrained-steps", "--out", str(tmp_path / "d.png")])
    assert asked.exit_code == 0 and "timesteps [999, 499]" in asked.output


def test_bad_inputs_are_clear_errors(tiny_sd, tiny_dino, digit_shards, tmp_path):
    missing_model = run_cli("train", "-c", str(TINY_CONFIG),
                        *tiny_overrides(tmp_path / "no_such_model", tiny_dino, digit_shards, tmp_path / "r1"))
    assert missing_model.returncode == 2 and "no_such_model" in missing_model.stderr
    missing_shard = run_cli("train", "-c", str(TINY_CONFIG),
                        *tiny_overrides(tiny_sd, tiny_dino, f"{digit_shards}/{{00000..00011}}.tar", tmp_path / "r2"))
    assert missing_shard.returncode == 2 and "4 of 12 shards are missing" in missing_shard.stderr
    assert "00011.tar" in missing_shard.stderr


def test_the_log_holds_each_terms_weighted_value_and_gradient_norm_and_measuring_changes_nothing(
        tiny_sd, tiny_dino, digit_shards, tmp_path):
    """On the last step of a log window the generator phase reports, for each weighted term, the norm of its gradient
    at the student's x0: equal to the same terms computed by hand on that batch. The discriminator phase reports
    gamma * R1 and its share of the hinge. Measuring (log.term_norms) leaves the trained weights bit for bit alone."""
    from addpipe.train import losses
    from addpipe.train.loop import Trainer, train
    from addpipe.train.methods.add.method import FAKE
    from addpipe.train.models import vae_decode
    from addpipe.train.schedule import add_noise, predicted_x0

    def config(run, **extra):
        return load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=2, **{
            "engine.zero": 0, "log.every": 2, "discriminator.augment": "color,translation,cutout", **extra}))

    trainer = Trainer(config(tmp_path / "by_hand"))
    method = trainer.method
    assert method.config.discriminator.spectral_norm and method.config.discriminator.augment
    state = method.begin_step(next(trainer.data), 1)
    assert state.measure and not method.begin_step(next(trainer.data), 0).measure  # the window's last step only
    terms = method.generator_terms(state)

    inputs, noise = state.inputs, state.noise
    timesteps = torch.tensor(method.timesteps)[noise.student_index]
    alpha, sigma = method.student_schedule.at(timesteps, 4)
    x_s = add_noise(inputs.sources, noise.noise, alpha, sigma)
    output = method.student.module(x_s, timesteps, **inputs.conditioning.unet_kwargs(inputs.time_ids), return_dict=False)[0]
    x0 = predicted_x0(output, x_s, alpha, sigma, method.student_schedule.prediction_type)
    fake = vae_decode(method.teacher, x0)
    heads = method.discriminator.module
    adversarial = losses.generator_adversarial_loss(heads(heads.features(method.augmented(fake, state, FAKE)),
                                                          method.text_condition(inputs), inputs.source_embedding))
    target, weight = method.teacher_target(x0, inputs, noise.teacher_t, noise.teacher_noise)
    with torch.no_grad():
        target = vae_decode(method.teacher, target)
    distillation = 2.5 * losses.distillation_loss(fake, target, weight)
    by_hand = {name: torch.autograd.grad(term, x0, retain_graph=True)[0].norm()
               for name, term in (("generator_adversarial", adversarial), ("distillation", distillation))}
    torch.testing.assert_close(terms["loss/generator_adversarial"], adversarial, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_weighted/distillation"], distillation.detach(), rtol=1e-5, atol=1e-8)
    for name, norm in by_hand.items():
        assert norm > 0
        torch.testing.assert_close(terms[f"grad_norm/{name}"], norm, rtol=1e-4, atol=1e-9)

    found = method.discriminator_terms(state)
    gamma = method.config.discriminator.r1_gamma
    torch.testing.assert_close(found["loss_weighted/r1"], gamma * found["loss/r1"])
    hinge = found["loss/discriminator_real"] + found["loss/discriminator_fake"]
    torch.testing.assert_close(found["loss_weighted/r1_share"], (gamma * found["loss/r1"] / hinge).detach())
    torch.testing.assert_close(found["grad_norm/heads_at_real_features"], (2 * found["loss/r1"]).sqrt())
    assert found["grad_norm/heads_at_fake_features"] > 0
    trainer.close()

    train(config(tmp_path / "measured"))
    train(config(tmp_path / "plain", **{"log.term_norms": "false"}))
    lines = [json.loads(line) for line in (tmp_path / "measured" / "metrics.jsonl").read_text().splitlines()]
    assert {"grad_norm/distillation", "grad_norm/generator_adversarial", "loss_weighted/r1"} <= set(lines[-1])
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("grad_norm/") for key in plain[-1])
    a, b = unet_weights(tmp_path / "measured" / "student"), unet_weights(tmp_path / "plain" / "student")
    assert all(torch.equal(a[key], b[key]) for key in a)
