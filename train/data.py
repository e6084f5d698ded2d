"""Training data: WebDataset shards (the shard contract of addpipe/shards.py) read as deterministic, resumable streams.

The data is cut into `world_size * streams_per_rank` streams. Each epoch shuffles the shard list with
a seed and deals the shards to the streams round-robin; a stream reads its shards in order and wraps
into the next epoch, so epochs are resampled forever. A rank owns `streams_per_rank` consecutive
streams (one per DataLoader worker) and builds each micro-batch from an equal chunk of each of them.

Three properties follow, and the tests rely on them:
- The global batch of a step depends only on (shards, seed, total streams), not on how streams are
  spread over ranks: two ranks with one worker each see exactly what one rank with two workers sees.
- A stream's position is (epoch, shard index, sample offset) after its last delivered chunk; saved in
  a checkpoint, it lets a resumed run continue with the very next sample.
- A run resumed with another number of streams (other ranks or workers) re-deals what is left: for every
  epoch some stream is still in, the shards (and the rest of each half-read shard) that no stream has read
  yet are dealt round-robin to the new streams, as explicit `plans`; after those epochs the usual deal of
  the new layout takes over. Nothing unread is skipped and nothing read is read again (`redeal`).
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import random
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from addpipe.shards import IMAGE_KEYS, ShardError, expand_shards

logger = logging.getLogger(__name__)


def no_usable_samples(shards: list[str], reasons: dict[int, str], shown: int = 10) -> str:
    listed = "; ".join(f"{shards[i]}: {reasons[i]}" for i in sorted(reasons)[:shown])
    more = f"; and {len(reasons) - shown} more" if len(reasons) > shown else ""
    return (f"no usable sample in a full pass over all {len(shards)} shard(s): {listed}{more}. "
            "Check data.shards, data.caption_key and the image keys (jpg, jpeg, png, webp)")


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass
class StreamState:
    """Where a stream continues: the next sample is `offset` into the `shard`-th entry of its deal for `epoch`.
    `plans` holds explicit deals (epoch -> [(shard index, first sample)]) that a re-deal gave this stream."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    skipped: int = 0
    plans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "skipped": self.skipped,
                "plans": {str(e): [list(entry) for entry in plan] for e, plan in self.plans.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StreamState":
        plans = {int(e): [(int(i), int(o)) for i, o in plan] for e, plan in data.get("plans", {}).items()}
        return cls(int(data["epoch"]), int(data["shard"]), int(data["offset"]), int(data.get("skipped", 0)), plans)


def deal(stream: int, epoch: int, state: StreamState, num_streams: int, num_shards: int, seed: int) -> list[tuple[int, int]]:
    """The (shard index, first sample) entries `stream` reads in `epoch`: its plan there, or the usual deal."""
    if epoch in state.plans:
        return state.plans[epoch]
    return [(index, 0) for index in epoch_order(num_shards, seed, epoch)[stream::num_streams]]


def redeal(states: dict[int, StreamState], old_streams: int, new_streams: int, num_shards: int,
           seed: int) -> dict[int, StreamState]:
    """Every old stream's unread work, dealt to `new_streams` streams (see the module docstring)."""
    first = min(state.epoch for state in states.values())
    last = max([state.epoch for state in states.values()] + [e for state in states.values() for e in state.plans])
    pools: dict[int, list[tuple[int, int]]] = {epoch: [] for epoch in range(first, last + 1)}
    for stream in sorted(states):
        state = states[stream]
        for epoch in range(max(first, state.epoch), last + 1):
            entries = deal(stream, epoch, state, old_streams, num_shards, seed)
            if epoch == state.epoch:
                entries = entries[state.shard:]
                if entries and state.offset > entries[0][1]:  # the shard it was reading: from the next sample on
                    entries = [(entries[0][0], state.offset)] + entries[1:]
            pools[epoch].extend(entries)
    skipped = sum(state.skipped for state in states.values())
    return {j: StreamState(epoch=first, skipped=skipped if j == 0 else 0,
                           plans={epoch: pool[j::new_streams] for epoch, pool in pools.items()})
            for j in range(new_streams)}


def load_image(sample: dict[str, Any]) -> Image.Image:
    for key in IMAGE_KEYS:
        if key in sample:
            with Image.open(io.BytesIO(sample[key])) as image:
                image.load()
                return image.convert("RGB")
    raise ValueError(f"sample {sample.get('__key__')} has none of the image keys {IMAGE_KEYS}")


def resize_and_crop(image: Image.Image, resolution: int, rng: Optional[random.Random]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Shorter side to `resolution` (bicubic), then a square crop (random when rng is given).
    Returns pixels in [-1, 1] (3, R, R) and the crop's (top, left) for SDXL's time ids."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    if rng is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data)).astype(np.float32))


def precomputed(sample: dict[str, Any], meta: dict[str, Any], signature: Optional[dict[str, Any]]) -> Optional[dict[str, torch.Tensor]]:
    """Latents and text embeddings written by `addpipe prep encode`, when they fit this run's signature."""
    if signature is None or "latents.npy" not in sample or meta.get("addpipe_encoded") != signature:
        return None
    return {"latents": load_npy(sample["latents.npy"]), "prompt_embeds": load_npy(sample["prompt_embeds.npy"]),
            "pooled_embeds": load_npy(sample["pooled_embeds.npy"])}


def decode_sample(sample: dict[str, Any], resolution: int, caption_key: str, rng: Optional[random.Random],
                  signature: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One raw WebDataset sample -> tensors; raises on anything unusable (the caller skips and counts).
    With a `signature` (centre crops only), precomputed latents/text embeddings that match it come along."""
    if caption_key not in sample:
        raise ValueError(f"sample {sample.get('__key__')} has no {caption_key!r} caption")
    caption = sample[caption_key]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    image = load_image(sample)
    meta = json.loads(sample["json"]) if "json" in sample else {}
    original = (int(meta.get("original_height") or image.height), int(meta.get("original_width") or image.width))
    pixels, crop = resize_and_crop(image, resolution, rng)
    return {"pixels": pixels, "caption": caption.strip(), "original_size": original, "crop": crop,
            "encoded": precomputed(sample, meta, signature if rng is None else None)}


class SampleFormat(ABC):
    """How one raw WebDataset sample becomes training tensors, and how a chunk of them is stacked. The images the
    loader reads by default are one format (ImageSamples); a method that trains on something else (Diffusion2GAN's ODE
    pairs) brings its own from its folder (Method.sample_format). Instances go to the loader's worker processes:
    they must pickle."""

    @abstractmethod
    def decode(self, raw: dict[str, Any], rng: Optional[random.Random]) -> dict[str, Any]:
        """-> a dict with at least "caption"; raises on anything unusable (the loader skips and counts it). `rng`:
        the sample's own random source when data.random_crop is on, else None."""

    @abstractmethod
    def collate(self, decoded: list[dict[str, Any]]) -> dict[str, Any]:
        """Decoded samples -> stacked tensors by name (the Batch's fields, or its `extra`)."""


@dataclass
class ImageSamples(SampleFormat):
    """Images and captions (the curated shards), with the precomputed latents and text embeddings that `addpipe prep
    encode` wrote when they match `signature` (this run's encoding; None: never use them)."""

    resolution: int
    caption_key: str = "txt"
    signature: Optional[dict[str, Any]] = None

    def decode(self, raw: dict[str, Any], rng: Optional[random.Random]) -> dict[str, Any]:
        return decode_sample(raw, self.resolution, self.caption_key, rng, self.signature)

    def collate(self, decoded: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = [b["encoded"] for b in decoded]
        return {
            # precomputed tensors only when every sample of the chunk has them (else all encode on the fly)
            **({name: torch.stack([e[name] for e in encoded]) for name in encoded[0]} if all(encoded) else {}),
            "pixels": torch.stack([b["pixels"] for b in decoded]),
            "original_sizes": torch.tensor([b["original_size"] for b in decoded], dtype=torch.long),
            "crops": torch.tensor([b["crop"] for b in decoded], dtype=torch.long),
        }


class ShardStreams(torch.utils.data.IterableDataset):
    """Yields chunks of `chunk_size` decoded samples, each tagged with its stream and the stream's state."""

    def __init__(self, shards: list[str], stream_ids: list[int], num_streams: int, chunk_size: int,
                 sample_format: SampleFormat, seed: int = 0, random_crop: bool = False,
                 states: Optional[dict[int, StreamState]] = None):
        super().__init__()
        if len(shards) < num_streams:
            raise ShardError(
                f"{len(shards)} shards cannot feed {num_streams} data streams (world_size x max(1, num_workers)); "
                "use fewer workers or more, smaller shards"
            )
        self.shards, self.stream_ids, self.num_streams = shards, stream_ids, num_streams
        self.chunk_size, self.format = chunk_size, sample_format
        self.seed, self.random_crop = seed, random_crop
        self.states = states or {}
        self.reported: set[str] = set()  # shards already warned about (per process: each worker has its own)

    def samples(self, stream: int) -> Iterator[tuple[Optional[dict[str, Any]], StreamState]]:
        """Decoded samples of one stream forever; None stands for a skipped (corrupt) sample.

        Once the stream has read every shard without finding one usable sample (empty or unreadable tars,
        images that do not decode, missing captions) it raises ShardError naming each shard and why, instead of
        looping over them forever."""
        state = StreamState.from_dict(self.states[stream].as_dict()) if stream in self.states else StreamState()
        dry: dict[int, str] = {}  # shard index -> why it gave nothing usable, since this stream's last usable sample
        while True:
            mine = deal(stream, state.epoch, state, self.num_streams, len(self.shards), self.seed)
            while state.shard < len(mine):
                shard_index, first_sample = mine[state.shard]
                path = self.shards[shard_index]
                state.offset = max(state.offset, first_sample)
                whole_pass = state.offset == 0  # a pass resumed mid-shard says nothing about the shard's start
                index, usable, unusable, first_error, failure = -1, 0, 0, None, None
                try:
                    for index, raw in enumerate(wds.tarfile_samples([{"url": path}])):
                        if index < state.offset:
                            continue
                        rng = random.Random(hash((self.seed, stream, state.epoch, state.shard, index))) if self.random_crop else None
                        try:
                            decoded = self.format.decode(raw, rng)
                            decoded["key"] = f"{shard_index}/{raw.get('__key__')}"
                            usable += 1
                        except Exception as error:  # a corrupt image or missing caption: skip and count
                            state.skipped += 1
                            unusable += 1
                            first_error = first_error or f"{type(error).__name__}: {error}"
                            decoded = None
                        state.offset = index + 1
                        yield decoded, StreamState.from_dict(state.as_dict())
                except Exception as error:  # a truncated or unreadable shard: keep what was read, move on
                    if isinstance(error, (KeyboardInterrupt, GeneratorExit)):
                        raise
                    state.skipped += 1
                    failure = f"unreadable after {index + 1} samples ({type(error).__name__}: {error})"
                reason = failure or (f"{unusable} of {unusable + usable} samples unusable (first: {first_error})" if unusable
                                     else "no samples" if index < 0 else None)
                if reason and path not in self.reported:  # once per shard, not once per pass
                    self.reported.add(path)
                    logger.warning("shard %s: %s; later passes over it are not reported", path, reason)
                if usable:
                    dry.clear()
                elif whole_pass:
                    dry[shard_index] = reason or "no samples"
                    if len(dry) == len(self.shards):
                        raise ShardError(no_usable_samples(self.shards, dry))
                state.shard, state.offset = state.shard + 1, 0
            state.plans.pop(state.epoch, None)  # a finished epoch's plan is spent
            state.epoch, state.shard = state.epoch + 1, 0

    def chunks(self, stream: int) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for decoded, state in self.samples(stream):
            if decoded is not None:
                buffer.append(decoded)
            if len(buffer) == self.chunk_size:
                yield {**self.format.collate(buffer), "captions": [b["caption"] for b in buffer],
                       "keys": [b["key"] for b in buffer], "stream": stream, "state": state.as_dict()}
                buffer = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            iterators = [self.chunks(stream) for stream in self.stream_ids]
            while True:  # round-robin over this rank's streams, as DataLoader does over workers
                for iterator in iterators:
                    yield next(iterator)
        else:
            yield from self.chunks(self.stream_ids[info.id])


@dataclass
class Batch:
    captions: list[str]
    pixels: Optional[torch.Tensor] = None           # images in [-1, 1]; None for ODE pairs
    original_sizes: Optional[torch.Tensor] = None
    crops: Optional[torch.Tensor] = None
    streams: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)   # "<shard index>/<sample key>": which sample each row is
    latents: Optional[torch.Tensor] = None          # from `addpipe prep encode`, when the shards carry them
    prompt_embeds: Optional[torch.Tensor] = None
    pooled_embeds: Optional[torch.Tensor] = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # a method's own sample format's other tensors


CHUNK_FIELDS = ("captions", "keys", "stream", "state")
BATCH_TENSORS = ("pixels", "original_sizes", "crops", "latents", "prompt_embeds", "pooled_embeds")


_WORKERS: list = []
"""Every DataLoader worker process this process started (multiprocessing.Process objects)."""


def _end_workers_at_exit() -> None:
    """Kill the loader workers still alive. Registered when this module is imported, after multiprocessing's own exit
    handler (torch imports multiprocessing first), so it runs before that handler, which would join the workers
    forever: they ignore SIGTERM. A TrainingData that is never closed (an exception out of its first batch, caught
    by the caller) leaves them waiting for work, and its loader may still be alive, uncollected in a reference
    cycle, when the process exits."""
    for worker in _WORKERS:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=5)


import multiprocessing.util  # noqa: E402,F401 - its exit handler is registered before ours, so ours runs first

atexit.register(_end_workers_at_exit)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """SLURM signals every process of a job step, loader workers included: a worker that died of the SIGTERM
    would take the trainer down before it could checkpoint (train/preemption.py). The trainer ends its workers
    (TrainingData.close)."""
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


class TrainingData:
    """This rank's micro-batches plus the stream positions needed to resume them."""

    def __init__(self, config, rank: int, world_size: int, states: Optional[dict[str, Any]] = None,
                 sample_format: Optional[SampleFormat] = None):
        """`sample_format`: what the shards hold; default images and captions at data.resolution."""
        self.shards = expand_shards(config.shards)
        self.streams_per_rank = max(1, config.num_workers)
        if config.batch_size % self.streams_per_rank:
            raise ValueError(
                f"data.batch_size ({config.batch_size}) must be a multiple of the streams per rank "
                f"(max(1, data.num_workers) = {self.streams_per_rank})"
            )
        self.num_streams = world_size * self.streams_per_rank
        self.stream_ids = [rank * self.streams_per_rank + j for j in range(self.streams_per_rank)]
        self.layout = {"num_streams": self.num_streams, "num_shards": len(self.shards), "seed": config.seed}
        self.states = {s: StreamState() for s in self.stream_ids}
        if states:
            self.states.update(self.restore(states))
        dataset = ShardStreams(
            self.shards, self.stream_ids, self.num_streams, config.batch_size // self.streams_per_rank,
            sample_format or ImageSamples(config.resolution, config.caption_key), config.seed, config.random_crop,
            dict(self.states),
        )
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=config.num_workers,
            persistent_workers=config.num_workers > 0, prefetch_factor=2 if config.num_workers > 0 else None,
            worker_init_fn=_leave_stop_signals_to_the_trainer if config.num_workers > 0 else None,
        )
        self._iterator: Optional[Iterator[dict[str, Any]]] = None

    def __iter__(self) -> "TrainingData":
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self.loader)
            _WORKERS[:] = [w for w in _WORKERS if w.is_alive()] + list(getattr(self._iterator, "_workers", []))
        try:
            chunks = [next(self._iterator) for _ in range(self.streams_per_rank)]
        except ShardError as error:
            # From a DataLoader worker the message is wrapped in its traceback: keep only the reason.
            message = str(error)
            raise ShardError(message.rsplit("ShardError: ", 1)[-1].strip()) from None
        for chunk in chunks:
            self.states[chunk["stream"]] = StreamState.from_dict(chunk["state"])
        tensors = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]
                   if name not in CHUNK_FIELDS and all(name in c for c in chunks)}
        return Batch(
            **{name: tensors.pop(name) for name in BATCH_TENSORS if name in tensors}, extra=tensors,
            captions=[caption for c in chunks for caption in c["captions"]],
            streams=[c["stream"] for c in chunks for _ in c["captions"]],
            keys=[key for c in chunks for key in c["keys"]],
        )

    def close(self) -> None:
        """End the loader's workers. They ignore SIGTERM (see _leave_stop_signals_to_the_trainer), which is how
        DataLoader and multiprocessing's exit handler end workers that outstay their sentinel: left to those, a
        process would wait for them forever at exit. Ask them to stop, then kill what is left."""
        iterator, self._iterator = self._iterator, None
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", []))
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # the sentinel, a join with a timeout, then a SIGTERM the workers ignore
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
                worker.join(timeout=5)

    def restore(self, saved: dict[str, Any]) -> dict[int, StreamState]:
        """This rank's streams from a checkpoint's (every stream's) positions, re-dealt if the layout changed."""
        layout = saved.get("layout", {})
        streams = {int(k): StreamState.from_dict(v) for k, v in saved["streams"].items()}
        if layout == self.layout:
            return {s: streams[s] for s in self.stream_ids if s in streams}
        same_data = layout.get("num_shards") == self.layout["num_shards"] and layout.get("seed") == self.layout["seed"]
        if not same_data or set(streams) != set(range(layout.get("num_streams", -1))):
            logger.warning("the shards or data.seed changed since the checkpoint (%s -> %s): streams restart at epoch 0",
                           layout, self.layout)
            return {}
        logger.info("data streams %d -> %d: the rest of epoch(s) %s re-dealt", layout["num_streams"], self.num_streams,
                    sorted({s.epoch for s in streams.values()}))
        new = redeal(streams, layout["num_streams"], self.num_streams, len(self.shards), self.layout["seed"])
        return {s: new[s] for s in self.stream_ids}

    @property
    def skipped(self) -> int:
        return sum(state.skipped for state in self.states.values())

    def state_dict(self) -> dict[str, Any]:
        """Every stream's position, gathered from all ranks (collective): what a checkpoint holds."""
        from addpipe.train import distributed

        streams: dict[str, Any] = {}
        for part in distributed.all_gather_objects({str(k): v.as_dict() for k, v in self.states.items()}):
            streams.update(part)
        return {"layout": self.layout, "streams": streams}
