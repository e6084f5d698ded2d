"""LoRA students (student.lora) on tiny SD- and SDXL-style pipelines: one UNet, adapters the only trained weights,
the teacher equal to the base model with the adapters off, exact resumes, two ranks equal to one, and exports that
diffusers' own `load_lora_weights` reads back into the same images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from addpipe.config import load
from addpipe.train.config import TrainConfig
from conftest import TINY_CONFIG, run_cli, tiny_overrides, torchrun_batch
from test_train import cli

LORA = {"student.lora.rank": 4, "student.lora.init": "gaussian"}


def settings(request, architecture: str, run: Path, **extra) -> list[str]:
    return tiny_overrides(request.getfixturevalue(f"tiny_{architecture}"), request.getfixturevalue("tiny_dino"),
                          request.getfixturevalue("digit_shards"), run, **{**LORA, **extra})


def lora_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "pytorch_lora_weights.safetensors"))


def unet_inputs(unet, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(2, 4, unet.config.cross_attention_dim, generator=generator)
    kwargs = {"encoder_hidden_states": hidden}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=generator),
                                       "time_ids": torch.tensor([[16, 16, 0, 0, 16, 16]] * 2, dtype=torch.float32)}
    return sample, torch.tensor([999, 499]), kwargs


@pytest.mark.parametrize("architecture", ["sd", "sdxl"])
def test_only_adapters_train_and_the_teacher_is_the_base_with_them_off(request, architecture, tmp_path):
    from diffusers import UNet2DConditionModel

    from addpipe.train.checkpoint import read_tensors
    from addpipe.train.loop import Trainer

    config = load(TrainConfig, TINY_CONFIG, settings(request, architecture, tmp_path / "run", steps=2,
                                                     **{"optim.ema_decay": 0.9}))
    trainer = Trainer(config)
    student = trainer.models["student"]
    names = {id(p): n for n, p in student.module.named_parameters()}
    assert student.trainable and all("lora_" in names[id(p)] for p in student.trainable)
    # ZeRO flattens what it optimises into one fp32 buffer (padded for alignment): it holds the adapters alone
    optimizer = student.engine.optimizer
    optimized = sum(p.numel() for group in getattr(optimizer, "optimizer", optimizer).param_groups for p in group["params"])
    adapters = sum(p.numel() for p in student.trainable)
    assert adapters <= optimized <= adapters + 64
    assert sum(p.numel() for p in student.trainable) < 0.2 * sum(p.numel() for p in student.module.parameters())
    # one UNet: the teacher's own, not a second copy; the memory plan counts what was built
    assert student.module is trainer.method.teacher.unet
    from addpipe.train.memory import plan_memory

    planned = {line.name.split(" (")[0]: line for line in plan_memory(config, 1).lines}
    assert planned["student LoRA adapters, rank 4"].params == sum(p.numel() for p in student.trainable)
    assert planned["UNet base"].params == sum(p.numel() for n, p in student.module.named_parameters() if "lora_" not in n)
    assert "teacher UNet" not in planned

    base_before = {n: p.detach().clone() for n, p in student.module.named_parameters() if "lora_" not in n}
    trainer.run()
    after = dict(student.module.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in base_before.items())  # the frozen base did not move
    assert student.trainable[0].grad is None  # cleared after each step, never left on the base either
    assert all(after[n].grad is None for n in base_before)

    checkpoint = read_tensors(tmp_path / "run/checkpoints/step_00000002", "student.")
    assert checkpoint and all("lora_" in key for key in checkpoint)  # weights, Adam moments and EMA: adapters only
    assert any(key.startswith("student.ema.") for key in checkpoint)

    teacher_unet = request.getfixturevalue(f"tiny_{architecture}") / "unet"
    base = UNet2DConditionModel.from_pretrained(teacher_unet).eval()
    sample, timesteps, kwargs = unet_inputs(base)
    module = student.module.eval()
    with torch.no_grad():
        expected = base(sample, timesteps, **kwargs).sample
        as_teacher = trainer.method.teacher_unet(sample, timesteps, **kwargs).sample
        as_student = module(sample, timesteps, **kwargs).sample
    torch.testing.assert_close(as_teacher, expected, atol=1e-6, rtol=1e-5)
    assert (as_student - expected).abs().max() > 1e-4  # the adapters are on again, and trained


@pytest.mark.slow
def test_the_lora_export_loads_in_diffusers_and_samples_as_addpipe_does(request, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from addpipe.train.models import encode_prompts
    from addpipe.train.sampling import load_student, sample_latents

    run = tmp_path / "run"
    cli("train", "-c", str(TINY_CONFIG), *settings(request, "sd", run, steps=2))
    assert {p.name for p in run.iterdir()} >= {"student", "student_raw", "student_lora", "student_lora_raw"}
    info = json.loads((run / "student_lora" / "addpipe_student.json").read_text())
    assert info["lora"]["r"] == 4 and info["base_model"] == str(request.getfixturevalue("tiny_sd"))

    pipe = StableDiffusionPipeline.from_pretrained(request.getfixturevalue("tiny_sd"), safety_checker=None)
    pipe.load_lora_weights(run / "student_lora")  # diffusers' standard LoRA loading
    pipe.scheduler = LCMScheduler.from_pretrained(run / "student_lora", subfolder="scheduler")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with_lora = pipe("a red two", timesteps=[999], guidance_scale=0.0, height=16, width=16, latents=noise.clone(),
                     output_type="latent").images

    components, schedule, _ = load_student(str(run / "student"), torch.device("cpu"))  # the fused export
    kwargs = encode_prompts(components, ["a red two"], "cpu").unet_kwargs(None)
    ours = sample_latents(lambda x, t: components.unet(x, t, **kwargs, return_dict=False)[0], schedule, noise, [999])
    torch.testing.assert_close(ours, with_lora, atol=2e-4, rtol=1e-4)

    # the fused UNet is base + LoRA: equal outputs on the same inputs
    sample, timesteps, kwargs = unet_inputs(components.unet)
    with torch.no_grad():
        fused = components.unet(sample, timesteps, **kwargs).sample
        adapted = pipe.unet(sample, timesteps, **kwargs).sample
    torch.testing.assert_close(fused, adapted, atol=1e-5, rtol=1e-4)
    # an eval arm takes the LoRA on its base (SOURCE+LORA) and draws what the fused export draws
    from addpipe.eval.generate import Arm, arm_call_kwargs, load_arm_pipeline

    arm = Arm.parse(f"lora={request.getfixturevalue('tiny_sd')}+{run / 'student_lora'}:steps=1")
    assert arm.lora == str(run / "student_lora") and arm_call_kwargs(arm)["timesteps"] == [999]
    arm_pipe = load_arm_pipeline(arm, torch.device("cpu"), torch.float32)
    assert type(arm_pipe.scheduler).__name__ == "LCMScheduler"
    via_arm = arm_pipe("a red two", timesteps=[999], guidance_scale=0.0, height=16, width=16, latents=noise.clone(),
                       output_type="latent").images
    torch.testing.assert_close(via_arm, ours, atol=2e-4, rtol=1e-4)
    # and the raw/EMA pair differ (the EMA is over the adapters)
    assert not all(torch.equal(a, b) for a, b in zip(lora_weights(run / "student_lora").values(),
                                                     lora_weights(run / "student_lora_raw").values()))


def test_a_lora_resume_equals_the_uninterrupted_run(request, tmp_path):
    from addpipe.train.loop import train

    def config(run, steps):
        return load(TrainConfig, TINY_CONFIG, settings(request, "sd", run, steps=steps, **{"optim.ema_decay": 0.9}))

    train(config(tmp_path / "whole", 4))
    train(config(tmp_path / "split", 2))
    train(config(tmp_path / "split", 4), resume=True)
    for name in ("student_lora", "student_lora_raw"):
        a, b = lora_weights(tmp_path / "whole" / name), lora_weights(tmp_path / "split" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


TWO_RANK_BACKENDS = {"deepspeed": {"engine.zero": 3}, "fsdp2": {}}


@pytest.fixture(scope="module")
def two_rank_lora(request, tmp_path_factory):
    """Each backend's LoRA run on two ranks, both in one torchrun launch. -> {backend: run directory}."""
    root = tmp_path_factory.mktemp("two_rank_lora")
    runs = {backend: root / backend for backend in TWO_RANK_BACKENDS}
    torchrun_batch([{"report": root / f"{backend}.json",
                     "overrides": settings(request, "sd", run, **lora_common(backend),
                                           **{"data.batch_size": 2, "data.num_workers": 1})}
                    for backend, run in runs.items()], root)
    return runs


def lora_common(backend: str) -> dict:
    return {"steps": 3, "discriminator.virtual_batch_size": 2, "engine.backend": backend, **TWO_RANK_BACKENDS[backend]}


@pytest.mark.slow
@pytest.mark.parametrize("backend", TWO_RANK_BACKENDS)
def test_two_rank_lora_runs_match_one_rank(request, tmp_path, backend, two_rank_lora):
    """Global batch 4 either way; local batch-norm groups of 2 keep each stream's samples in their own group."""
    from addpipe.train.loop import train

    one = tmp_path / "one"  # in this process: a second's start instead of twenty
    train(load(TrainConfig, TINY_CONFIG, settings(request, "sd", one, **lora_common(backend),
                                                  **{"data.batch_size": 4, "data.num_workers": 2})))
    two = two_rank_lora[backend]
    for export in ("student_lora", "student_lora_raw"):  # the EMA'd adapters and the trained ones
        a, b = lora_weights(one / export), lora_weights(two / export)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-3, msg=f"{export}: {key}")


def test_target_modules_that_match_nothing_are_refused_by_name(request, tmp_path):
    result = run_cli("train", "-c", str(TINY_CONFIG), *settings(request, "sd", tmp_path / "run", steps=1,
                                                           **{"student.lora.target_modules": "[to_qq, to_k]"}))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "student.lora.target_modules ['to_qq'] match no Linear or Conv2d layer" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_lora_with_a_student_init_is_refused():
    with pytest.raises(Exception, match="student.lora adapts the teacher's own UNet"):
        load(TrainConfig, TINY_CONFIG, ["student.lora.rank=4", "model.student_init=/somewhere"])


@pytest.mark.parametrize("architecture", ["sd", "sdxl"])
def test_a_lora_with_convolutions_loads_whole_in_diffusers(request, architecture, tmp_path):
    """student.lora.convolutions (the setting of the LoRA configs): diffusers' load_lora_weights loads every adapter,
    attention and convolution alike, without a warning, and the loaded UNet equals the fused export. (Exported with
    attention keys renamed and convolution keys not, diffusers skipped all attention adapters.)"""
    import warnings

    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from addpipe.train.config import StudentLoraConfig
    from addpipe.train.lora import adapter_metadata, add_adapters, split_state

    teacher = request.getfixturevalue(f"tiny_{architecture}")
    config = StudentLoraConfig(rank=4, convolutions=True)
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    add_adapters(unet, config)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in unet.named_parameters():  # a trained adapter: B is no longer zero
        if "lora_B" in name:
            parameter.data = 0.1 * torch.randn(parameter.shape, generator=generator)
    adapted_modules = {name.rsplit(".lora_B", 1)[0] for name, _ in unet.named_parameters() if "lora_B" in name}
    assert any(m.endswith(".conv1") for m in adapted_modules) and any(m.endswith(".to_q") for m in adapted_modules)
    lora, fused_state = split_state(unet.state_dict(), unet.config, config)

    pipe = DiffusionPipeline.from_pretrained(teacher, safety_checker=None) if architecture == "sd" else \
        DiffusionPipeline.from_pretrained(teacher)
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=lora, unet_lora_adapter_metadata=adapter_metadata(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(tmp_path)
    assert not [w for w in caught if "inconsisten" in str(w.message) or issubclass(w.category, RuntimeWarning)], \
        [str(w.message)[:300] for w in caught]
    loaded = {name.rsplit(".lora_B", 1)[0] for name, _ in pipe.unet.named_parameters() if "lora_B" in name}
    assert loaded == adapted_modules  # every module, not 47 of 79

    fused = UNet2DConditionModel.from_config(unet.config)
    fused.load_state_dict(fused_state)
    sample, timesteps, kwargs = unet_inputs(fused)
    with torch.no_grad():
        expected = fused.eval()(sample, timesteps, **kwargs).sample
        got = pipe.unet.eval()(sample, timesteps, **kwargs).sample
        base = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()(sample, timesteps, **kwargs).sample
    assert (expected - base).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
