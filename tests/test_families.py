"""The model-family seam: a family defined here and nowhere else is chosen by `model.architecture` (or found from the
teacher's model_index.json), and the trainer, the memory plan, the export and the sampler all go through it,
without an edit to any file under train/.

The family is a real one: "clip skip 2", the text conditioning many SD 1.5 fine-tunes were trained with (the CLIP
text encoder's penultimate hidden state instead of its last)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from addpipe.config import ConfigError, load
from addpipe.train.config import TrainConfig
from addpipe.train.families import family, family_names, register_family
from addpipe.train.families.unet import StableDiffusion
from addpipe.train.models import TextConditioning, detect_architecture, encode_prompts, load_teacher
from conftest import TINY_CONFIG, run_cli, tiny_overrides

ENCODED: list[int] = []
"""How many prompts the plug-in has encoded: the trainer must have asked it, not the built-in family."""


@register_family
class ClipSkip(StableDiffusion):
    name = "sd-clip-skip"
    summary = "SD 1.x with clip skip 2: the text encoder's penultimate hidden state"

    def matches(self, index):
        return super().matches(index) and index.get("_clip_skip") == 2

    def encode(self, components, prompts, device):
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        ENCODED.append(len(prompts))
        # the final layer norm applies to the penultimate state too, as the fine-tunes' own pipelines do
        hidden = encoder.final_layer_norm(output.hidden_states[-2])
        return TextConditioning(hidden, output.pooler_output)


def penultimate(components, prompt: str) -> torch.Tensor:
    """The clip-skip conditioning written out independently of the family."""
    tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids, output_hidden_states=True).hidden_states
        return encoder.final_layer_norm(states[-2])


def test_a_family_is_chosen_by_name_or_found_from_the_directory_and_unknown_ones_are_named(tiny_sd, tmp_path):
    assert {"sd", "sdxl", "sd-clip-skip"} <= set(family_names())
    assert detect_architecture(str(tiny_sd)) == "sd"  # an ordinary SD directory stays with the built-in family
    marked = tmp_path / "clip_skip_model"
    shutil.copytree(tiny_sd, marked)
    index = json.loads((marked / "model_index.json").read_text())
    (marked / "model_index.json").write_text(json.dumps({**index, "_clip_skip": 2}))
    assert detect_architecture(str(marked)) == "sd-clip-skip"
    assert load_teacher(load(TrainConfig, TINY_CONFIG, [f"model.teacher={marked}"]).model).family is family("sd-clip-skip")

    with pytest.raises(ConfigError, match="model.architecture='nope' is not a known model family: auto or one of "
                                          ".*sd, sd-clip-skip, sd3, sdxl"):
        load(TrainConfig, TINY_CONFIG, ["model.architecture=nope"])
    unknown = tmp_path / "not_a_t2i_model"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline", "vocoder": ["x", "y"]}))
    result = run_cli("train", "-c", str(TINY_CONFIG), f"model.teacher={unknown}", "--dry-run")
    assert result.returncode == 2 and "no model family recognises this pipeline (components: vocoder" in result.stderr


def test_the_trainer_plan_export_and_sampler_go_through_a_plug_in_family(tiny_sd, tiny_dino, digit_shards, tmp_path):
    from addpipe.train import generate, load_student
    from addpipe.train.loop import Trainer
    from addpipe.train.memory import plan_memory

    run = tmp_path / "run"
    config = load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=1,
                                                           **{"model.architecture": "sd-clip-skip",
                                                              "data.num_workers": 0}))
    assert "teacher UNet (frozen)" in [line.name for line in plan_memory(config, 1, torch.float32).lines]

    ENCODED.clear()
    trainer = Trainer(config)
    teacher = trainer.method.teacher
    assert teacher.family is family("sd-clip-skip")
    want = penultimate(teacher, "a red two")
    torch.testing.assert_close(encode_prompts(teacher, ["a red two"], "cpu").hidden_states, want)
    assert not torch.allclose(want, StableDiffusion().encode(teacher, ["a red two"], "cpu").hidden_states.detach())
    out = trainer.run()
    assert sum(ENCODED) >= config.data.batch_size  # the step's captions went through the plug-in

    info = json.loads((out / "addpipe_student.json").read_text())
    assert info["architecture"] == "sd-clip-skip"
    components, schedule, info = load_student(str(out), torch.device("cpu"))
    assert components.family is family("sd-clip-skip")
    ENCODED.clear()
    first = generate(components.unet, components, schedule, ["a red two"], info["timesteps"], 5, 16, torch.device("cpu"))
    again = generate(components.unet, components, schedule, ["a red two"], info["timesteps"], 5, 16, torch.device("cpu"))
    assert ENCODED == [1, 1] and torch.equal(first, again)
