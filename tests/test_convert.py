"""`addpipe convert`: a single-file fine-tune in the original SD layout becomes the diffusers folder it came from,
tensor for tensor, and every bad input is one line that leaves no folder behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from ldm_checkpoint import write_sd_single_file


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "finetune.safetensors"
    counts = write_sd_single_file(tiny_sd, path)
    assert all(counts.values()), counts
    return path


def weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_a_single_file_checkpoint_converts_back_to_its_diffusers_folder_exactly(tiny_sd, single_file, tmp_path):
    out = tmp_path / "converted"
    result = run_cli("convert", single_file, "--like", tiny_sd, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model.teacher={out}" in result.stdout and "(sd," in result.stdout
    for component in ("unet", "vae", "text_encoder"):
        ours, original = weights(out / component), weights(tiny_sd / component)
        assert ours.keys() == original.keys(), component
        for key in ours:
            assert torch.equal(ours[key].float(), original[key].float()), f"{component}.{key}"
        config = json.loads((out / component / "config.json").read_text())
        assert {k: v for k, v in config.items() if not k.startswith("_")} == \
            {k: v for k, v in json.loads((tiny_sd / component / "config.json").read_text()).items() if not k.startswith("_")}
    from transformers import CLIPTokenizer

    prompt = "a red digit seven"
    assert CLIPTokenizer.from_pretrained(out / "tokenizer")(prompt).input_ids == \
        CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")(prompt).input_ids
    assert "Warning" not in result.stderr and "kept in float32" not in result.stderr
    from addpipe.train.models import detect_architecture

    assert detect_architecture(str(out)) == "sd"
    assert not list(tmp_path.glob(".*converting*"))  # staged beside it and renamed into place

    half = tmp_path / "half"
    assert run_cli("convert", single_file, "--like", tiny_sd, "--out", half, "--dtype", "float16").returncode == 0
    assert all(v.dtype == torch.float16 for v in weights(half / "unet").values())


def test_bad_checkpoints_and_folders_are_named_in_one_line(tiny_sd, tiny_sdxl, single_file, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    no_index = tmp_path / "empty_like"
    no_index.mkdir()
    cases = [
        ([tmp_path / "missing.safetensors", "--like", tiny_sd], "missing.safetensors: no such file"),
        ([garbage, "--like", tiny_sd], "not a readable checkpoint"),
        ([lora, "--like", tiny_sd], "holds no Stable Diffusion UNet"),
        ([tiny_sd / "model_index.json", "--like", tiny_sd], "a diffusers folder needs no conversion"),
        ([single_file, "--like", no_index], "no model_index.json in that folder"),
        ([single_file, "--like", "no-such-org/no-such-model"], "could not read its model_index.json"),
        ([single_file], "stable-diffusion-v1-5"),  # diffusers' guess from the keys, not in this offline cache
        ([single_file, "--like", tiny_sdxl], "did not convert as a sdxl model"),
        ([single_file, "--like", tiny_sd, "--dtype", "int8"], "--dtype int8: one of"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        result = run_cli("convert", *args, "--out", out)
        assert result.returncode != 0 and expected in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert not out.exists() and not list(tmp_path.glob(".*converting*")), args
    result = run_cli("convert", single_file, "--like", tiny_sd, "--out", taken)
    assert result.returncode != 0 and "exists and is not empty" in result.stderr
    assert sorted(p.name for p in taken.iterdir()) == ["something"]
