"""`addpipe prep encode`: precompute the teacher's VAE latents and text embeddings into the shards.

Each sample gains `latents.npy` (scaled VAE posterior mean of the centre crop at data.resolution),
`prompt_embeds.npy` (the UNet's encoder hidden states) and `pooled_embeds.npy`, and its json an
`addpipe_encoded` signature (teacher, vae, resolution). The trainer uses them when the signature matches
its own config and crops are centred; otherwise it encodes on the fly as before. At SDXL scale this
removes the VAE encoder and both text encoders from every training step.

Shards are rewritten in place atomically (tmp + rename); `NNNNN_encoded.json` beside a shard marks it
done, so an interrupted run resumes with the next shard.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from addpipe.shards import write_tar
from addpipe.shards import expand_shards
from addpipe.train.data import decode_sample
from addpipe.devices import resolve_device
from addpipe.train.models import encode_prompts, load_teacher, vae_encode

logger = logging.getLogger(__name__)
ENCODED_KEYS = ("latents.npy", "prompt_embeds.npy", "pooled_embeds.npy")


def encoding_signature(train_config) -> dict[str, Any]:
    """What precomputed tensors depend on; the trainer compares it with its own config."""
    return {"teacher": train_config.model.teacher, "revision": train_config.model.revision,
            "vae": train_config.model.vae, "resolution": train_config.data.resolution}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _marker(shard: str) -> Path:
    return Path(shard).with_name(Path(shard).name.removesuffix(".tar") + "_encoded.json")


def encode_shards(train_config, shards: str, batch_size: int = 32, device: str = "auto", storage: str = "float16") -> dict[str, int]:
    """Add latents and text embeddings to every shard of `shards` (a pattern or directory); -> counts."""
    paths = expand_shards(shards)
    signature = encoding_signature(train_config)
    target = resolve_device(device)
    dtype = {"float16": np.float16, "float32": np.float32}[storage]
    todo = [p for p in paths if not (_marker(p).exists() and json.loads(_marker(p).read_text()) == {**signature, "storage": storage})]
    counts = {"shards": len(paths), "encoded_shards": 0, "samples": 0, "skipped": 0}
    if not todo:
        return counts
    teacher = load_teacher(train_config.model, with_unet=False)
    teacher.vae.to(target)
    for encoder in teacher.text_encoders:
        encoder.to(target)
    for path in tqdm(todo, desc="encode shards", disable=None):
        samples = list(wds.tarfile_samples([{"url": path}]))
        usable, decoded = [], []
        for sample in samples:
            try:
                decoded.append(decode_sample(sample, train_config.data.resolution, train_config.data.caption_key, None))
                usable.append(sample)
            except Exception as error:  # the trainer would skip it too; keep it unencoded
                logger.warning("not encoding %s of %s: %s", sample.get("__key__"), path, error)
                counts["skipped"] += 1
        for start in range(0, len(usable), batch_size):
            chunk = decoded[start : start + batch_size]
            with torch.no_grad():
                latents = vae_encode(teacher, torch.stack([d["pixels"] for d in chunk]).to(target))
                text = encode_prompts(teacher, [d["caption"] for d in chunk], target)
            for i, sample in enumerate(usable[start : start + batch_size]):
                sample["latents.npy"] = npy_bytes(latents[i].float().cpu().numpy().astype(dtype))
                sample["prompt_embeds.npy"] = npy_bytes(text.hidden_states[i].float().cpu().numpy().astype(dtype))
                sample["pooled_embeds.npy"] = npy_bytes(text.pooled[i].float().cpu().numpy().astype(dtype))
                meta = json.loads(sample["json"]) if "json" in sample else {}
                meta["addpipe_encoded"] = signature
                sample["json"] = json.dumps(meta, sort_keys=True).encode()
        tmp = path + ".tmp"
        write_tar(Path(tmp), [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples])
        os.replace(tmp, path)
        _marker(path).write_text(json.dumps({**signature, "storage": storage}, sort_keys=True))
        counts["encoded_shards"] += 1
        counts["samples"] += len(usable)
    return counts
