"""A single-file checkpoint (`.safetensors` or `.ckpt` in the original Stable Diffusion layout, what most fine-tunes
ship) turned into the diffusers folder the trainer loads.

The conversion itself is diffusers' `from_single_file`, through the pipeline class of the family the checkpoint
belongs to; the folder it needs for everything a single file does not hold (the components' configs, the tokenizers,
the scheduler) is `like`: a local diffusers folder or a hub id of the same architecture, already in the cache
offline (`addpipe fetch` puts it there). Without `like`, diffusers' own guess from the checkpoint's keys names the
base model (SD 1.5, SD 2.1, SDXL base, ...).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from addpipe.train.families import family_of_index

log = logging.getLogger(__name__)
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted, said in one line."""


def guess_base_model(checkpoint: dict) -> str:
    """The hub id diffusers associates with a checkpoint's key layout."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    return fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]


def _model_index(like: str) -> dict:
    local = Path(os.path.expanduser(like))
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ConversionError(f"--like {like}: no model_index.json in that folder (a diffusers pipeline folder is needed)")
        return json.loads(index.read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(like, "model_index.json")).read_text())
    except Exception as error:  # offline and not cached, a typo, no access: one line
        raise ConversionError(f"--like {like}: could not read its model_index.json ({type(error).__name__}); fetch it "
                              f"first (`addpipe fetch model.teacher={like}` where there is a network) or pass a local "
                              "diffusers folder") from error


def convert_single_file(checkpoint: Path, out: Path, like: Optional[str] = None,
                        dtype: torch.dtype = torch.float32) -> dict:
    """Convert `checkpoint` into a diffusers folder at `out` (which must not hold anything yet); -> a summary:
    {"family", "like", "components"}. The folder is written beside `out` and renamed into place, so an interrupted
    conversion leaves nothing that looks like a model."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = Path(os.path.expanduser(str(checkpoint)))
    if not checkpoint.is_file():
        raise ConversionError(f"checkpoint {checkpoint}: no such file")
    if checkpoint.suffix not in SUFFIXES:
        raise ConversionError(f"checkpoint {checkpoint}: expected one of {', '.join(SUFFIXES)}; a diffusers folder "
                              "needs no conversion (pass it as model.teacher)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not empty: choose a new folder")
    try:
        state = load_single_file_checkpoint(str(checkpoint), local_files_only=True)
    except Exception as error:
        raise ConversionError(f"checkpoint {checkpoint}: not a readable checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not any(key.startswith(("model.diffusion_model.", "conditioner.", "cond_stage_model.")) for key in state):
        raise ConversionError(f"checkpoint {checkpoint}: holds no Stable Diffusion UNet (no 'model.diffusion_model.' "
                              f"keys among its {len(state)}); it may be a LoRA, a VAE or another kind of model")
    if like is None:
        like = guess_base_model(state)
        log.info("--like not given: the checkpoint's keys look like %s; its configs and tokenizers are used", like)
    family = family_of_index(_model_index(like), like)
    del state  # from_single_file reads the file again; not two copies of an SDXL in memory
    staging = out.parent / f".{out.name}.converting"
    shutil.rmtree(staging, ignore_errors=True)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "modules that should be kept in float32: []" on every component
    try:
        pipeline = family.pipeline_class().from_single_file(str(checkpoint), config=str(like), torch_dtype=dtype,
                                                            local_files_only=True)
        pipeline.save_pretrained(staging, safe_serialization=True)
    except ConversionError:
        raise
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConversionError(f"checkpoint {checkpoint} did not convert as a {family.name} model like {like} "
                              f"({type(error).__name__}: {first[:300]}); is --like the same architecture?") from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    components = sorted(name for name, value in pipeline.components.items() if value is not None)
    return {"family": family.name, "like": str(like), "components": components}
