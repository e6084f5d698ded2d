"""Diffusion2GAN's samples: ODE pairs from `addpipe pairs` shards (noise z, the teacher's latent x, the prompt's
embeddings), checked against this run's teacher, VAE, resolution and timestep spacing, as a sample format the
general loader (train/data.py) reads with its usual resuming, dealing and skipping."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch

from addpipe.train.data import SampleFormat, load_npy

PAIR_TENSORS = ("noise", "latents", "prompt_embeds", "pooled_embeds")
PAIR_MATCH = ("teacher", "revision", "vae", "resolution", "timestep_spacing")
"""What a pair must have been made with to train this run (the rest of the pair signature may differ)."""


def decode_pair(sample: dict[str, Any], signature: dict[str, Any]) -> dict[str, Any]:
    """One sample of `addpipe pairs` shards -> its tensors; raises (the loader skips and counts) on a sample that is
    not a pair, or a pair of another teacher or resolution than `signature` (this run's)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    made = meta.get("addpipe_pairs")
    if made is None or any(f"{name}.npy" not in sample for name in PAIR_TENSORS):
        raise ValueError(f"sample {sample.get('__key__')} is not an ODE pair (make the shards with `addpipe pairs`)")
    differs = [f"{k} {made.get(k)!r} (this run: {signature.get(k)!r})" for k in PAIR_MATCH if made.get(k) != signature.get(k)]
    if differs:
        raise ValueError(f"pair {sample.get('__key__')} was made with another {', '.join(differs)}")
    caption = sample.get("txt", b"")
    return {"caption": (caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)).strip(),
            "pair": {name: load_npy(sample[f"{name}.npy"]) for name in PAIR_TENSORS}}


@dataclass
class OdePairs(SampleFormat):
    """The pairs of `signature` (this run's pair_signature); the noise z arrives as the batch's extra["noise"]."""

    signature: dict[str, Any]

    def decode(self, raw: dict[str, Any], rng: Optional[random.Random]) -> dict[str, Any]:
        return decode_pair(raw, self.signature)

    def collate(self, decoded: list[dict[str, Any]]) -> dict[str, Any]:
        return {name: torch.stack([b["pair"][name] for b in decoded]) for name in PAIR_TENSORS}
