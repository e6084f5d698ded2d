"""`addpipe pairs`: Diffusion2GAN's first task, the teacher's noise -> latent correspondences.

For prompt i of the table, noise z_i is drawn from a generator seeded with (pairs.seed, i), and the teacher's
deterministic sampler (DDIM, eta 0, pairs.steps steps, guidance pairs.guidance) carries it to the final latent
x_i. Each sample of the output shards holds the pair and what the student trains on without the text encoders:

    <out>/pairs.json            the set: signature (teacher, sampler, steps, guidance, seed, resolution), prompt count
    <out>/NNNNN.tar             prompts [N*S, (N+1)*S) with S = pairs.samples_per_shard, each sample:
        noise.npy latents.npy   z_i and x_i (float32, the teacher's scaled latent space)
        prompt_embeds.npy pooled_embeds.npy   the conditional text embeddings the teacher used
        txt json                the prompt; index, seed and the signature
    <out>/NNNNN.json            the shard's receipt: pairs written, prompts skipped (with the reason), signature
    <out>/summary.json          once every shard is receipted: pairs + skipped = prompts, checked; skips by reason

A shard is written whole (tmp + rename) and then receipted, so a killed run redoes at most the shard it was in and
a rerun skips receipted shards. Shard N belongs to worker N mod W of W = array tasks x ranks, so any split of the
work produces the same files. Every prompt is accounted for: it is in its shard or in the receipt's `skipped`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from addpipe.devices import resolve_device
from addpipe.files import write_atomic, write_text_atomic
from addpipe.shards import write_tar
from addpipe.tables import TABLE_FORMATS, InputError, detect_format, read_one
from addpipe.train.encode import npy_bytes
from addpipe.train.models import diffusers_pipeline, encode_prompts, load_teacher, unconditional
from addpipe.train.sampling import vae_downsample_factor

MANIFEST = "pairs.json"
PAIR_KEYS = ("noise.npy", "latents.npy", "prompt_embeds.npy", "pooled_embeds.npy")


def pair_signature(config) -> dict[str, Any]:
    """What a pair depends on; a rerun into the same directory must agree on all of it."""
    pairs, model = config.pairs, config.model
    return {"teacher": model.teacher, "revision": model.revision, "vae": model.vae, "resolution": config.data.resolution,
            "sampler": pairs.sampler, "steps": pairs.steps, "guidance": pairs.guidance, "seed": pairs.seed,
            "timestep_spacing": ODE_SPACING}


ODE_SPACING = "trailing"
"""The ODE starts at T-1, the timestep the one-step generator reads its noise at. The teachers' own spacing
("leading" for SD 1.5 and SDXL) would start 50 steps at t = 981 (10 at 901): the pairs would map z, read as x_981,
to x, while the generator is trained to read the same z as x_999."""


def ode_scheduler(scheduler_config: dict, steps: int):
    """The teacher's DDIM sampler (eta 0) with the pairs' spacing, its timesteps set for `steps` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing=ODE_SPACING)
    scheduler.set_timesteps(steps)
    return scheduler


def read_prompts(path: str, column: str) -> list[str]:
    """The prompts, in table order; a missing value is an empty prompt (skipped later, and counted)."""
    source = Path(os.path.expanduser(path))
    if not source.is_file():
        raise InputError(f"prompt table {source} does not exist" if not source.exists() else f"{source} is not a file")
    fmt = detect_format(source, "auto", TABLE_FORMATS + ("txt",), setting="a known suffix (or .txt)")
    table = read_one(source, fmt)
    column = "prompt" if fmt == "txt" else column
    if column not in table.columns:
        raise InputError(f"prompt table {source} has no column {column!r}; its columns are: "
                         f"{', '.join(map(str, table.columns))} (set pairs.prompt_column)")
    return ["" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
            for value in table[column].tolist()]


def pair_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """z_i: a function of (seed, i) alone, so ranks, array tasks and reruns draw the same noise for prompt i. Not
    torch's CPU generator: it keeps 32 bits of its seed, so (seed, i) pairs would collide."""
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(index)])))
    return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32))


def worker_slot(task: int, tasks: int) -> tuple[int, int]:
    """(this worker, all workers) over SLURM array tasks and, inside each, torchrun/srun ranks."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= task < tasks:
        raise ValueError(f"--task {task} is not in 0..{tasks - 1}")
    return task * world + rank, tasks * world


def _receipt(out: Path, shard: int) -> Path:
    return out / f"{shard:05d}.json"


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write the set's manifest, or check that the one there describes the same set."""
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        differs = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
        if differs:
            detail = "; ".join(f"{k}: {found.get(k)!r} there, {manifest.get(k)!r} now" for k in differs)
            raise InputError(f"{out} holds ODE pairs of another set ({detail}): give a new --out, or remove it")
        return
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))


def collect_pairs(config, prompts: str, out: str, task: int = 0, tasks: int = 1, device: str = "auto",
                  progress: Optional[bool] = None) -> dict[str, int]:
    """Sample this worker's shards of ODE pairs into `out`; -> counts (shards done before are counted as reused)."""
    settings = config.pairs
    texts = read_prompts(prompts, settings.prompt_column)
    if not texts:
        raise InputError(f"prompt table {prompts} has no rows: no pairs to make")
    worker, workers = worker_slot(task, tasks)
    per_shard = settings.samples_per_shard
    shards = -(-len(texts) // per_shard)
    signature = pair_signature(config)
    root = Path(os.path.expanduser(out))
    root.mkdir(parents=True, exist_ok=True)
    _check_manifest(root, {"signature": signature, "prompts": len(texts), "samples_per_shard": per_shard,
                           "shards": shards})
    mine = list(range(worker, shards, workers))
    todo = [k for k in mine if not _receipt(root, k).is_file()]
    counts = {"prompts": len(texts), "shards": shards, "worker_shards": len(mine), "reused_shards": len(mine) - len(todo),
              "written_shards": 0, "pairs": 0, "skipped": 0}
    if not todo:
        return {**counts, **account(root, shards, len(texts))}

    target = resolve_device(device)
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    teacher = load_teacher(config.model, dtype=dtype)
    pipe = diffusers_pipeline(teacher, ode_scheduler(teacher.scheduler_config, settings.steps)).to(target)
    pipe.set_progress_bar_config(disable=True)
    empty = unconditional(teacher, target)
    size = config.data.resolution // vae_downsample_factor(teacher)
    shape = (teacher.unet.config.in_channels, size, size)
    total = sum(min(len(texts), (k + 1) * per_shard) - k * per_shard for k in todo)
    with tqdm(total=total, desc=f"ODE pairs (worker {worker}/{workers})", unit="pair", disable=progress is False) as bar:
        for shard in todo:
            indices = range(shard * per_shard, min(len(texts), (shard + 1) * per_shard))
            skipped = {i: "empty prompt" for i in indices if not texts[i].strip()}
            kept = [i for i in indices if i not in skipped]
            samples = []
            for start in range(0, len(kept), settings.batch_size):
                batch = kept[start:start + settings.batch_size]
                samples += _sample(pipe, teacher, empty, [texts[i] for i in batch], batch, shape, settings,
                                   config.data.resolution, signature, target, dtype)
                bar.update(len(batch))
            bar.update(len(skipped))
            write_atomic(root / f"{shard:05d}.tar", lambda tmp: write_tar(tmp, samples))
            write_text_atomic(_receipt(root, shard), json.dumps(
                {"shard": shard, "first": indices.start, "stop": indices.stop, "pairs": len(samples),
                 "skipped": {str(i): why for i, why in skipped.items()}, "signature": signature}, indent=1))
            counts["written_shards"] += 1
            counts["pairs"] += len(samples)
            counts["skipped"] += len(skipped)
    return {**counts, **account(root, shards, len(texts))}


def account(root: Path, shards: int, prompts: int) -> dict[str, Any]:
    """Once every shard is receipted (by whichever worker): `summary.json`, every prompt as a pair or a skip, checked.
    -> {"complete": bool, and when complete the set's "total_pairs" and "total_skipped"}."""
    receipts = [_receipt(root, k) for k in range(shards)]
    if not all(path.is_file() for path in receipts):
        return {"complete": False}
    found = [json.loads(path.read_text()) for path in receipts]
    pairs, skipped = sum(r["pairs"] for r in found), sum(len(r["skipped"]) for r in found)
    if pairs + skipped != prompts:  # a receipt edited or left from another set: say so rather than train on it
        raise InputError(f"{root}: the receipts account for {pairs} pairs + {skipped} skipped prompts, not the set's "
                         f"{prompts} prompts")
    reasons: dict[str, int] = {}
    for receipt in found:
        for why in receipt["skipped"].values():
            reasons[why] = reasons.get(why, 0) + 1
    write_text_atomic(root / "summary.json", json.dumps({"prompts": prompts, "pairs": pairs, "skipped": skipped,
                                                         "skipped_by_reason": reasons, "shards": shards}, indent=2))
    return {"complete": True, "total_pairs": pairs, "total_skipped": skipped}


@torch.no_grad()
def _sample(pipe, teacher, empty, prompts: list[str], indices: list[int], shape, settings, resolution: int,
            signature: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    n = len(prompts)
    noise = torch.stack([pair_noise(settings.seed, i, shape) for i in indices])
    text = encode_prompts(teacher, prompts, device)
    kwargs = teacher.family.pipeline_embeddings(text, empty.select([0] * n), resolution, dtype)
    latents = pipe(**kwargs, latents=noise.to(device, dtype), num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance, eta=0.0, height=resolution, width=resolution,
                   output_type="latent").images.float().cpu()
    samples = []
    for row, index in enumerate(indices):
        samples.append({
            "__key__": f"{index:09d}",
            "noise.npy": npy_bytes(noise[row].numpy()),
            "latents.npy": npy_bytes(latents[row].numpy()),
            "prompt_embeds.npy": npy_bytes(text.hidden_states[row].float().cpu().numpy()),
            "pooled_embeds.npy": npy_bytes(text.pooled[row].float().cpu().numpy()),
            "txt": prompts[row].encode(),
            "json": json.dumps({"index": index, "addpipe_pairs": signature}, sort_keys=True).encode(),
        })
    return samples
