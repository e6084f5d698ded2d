"""A small real image set that ships with scikit-learn: handwritten digits, upscaled and coloured,
captioned like "a handwritten seven in red on a blue background". The offline demo and the tests use it."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from PIL import Image

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (240, 140, 30), "purple": (140, 50, 180),
}


def digit_images(count: int, size: int = 32, seed: int = 0) -> Iterator[tuple[str, Image.Image, dict]]:
    """(caption, image, metadata) for `count` digits; foreground and background colours differ."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for index in range(count):
        source = index % len(digits.images)
        label = int(digits.target[source])
        ink = digits.images[source] / 16.0  # 8x8 in [0, 1]
        fg, bg = rng.choice(len(names), size=2, replace=False)
        fg_rgb, bg_rgb = np.array(COLOURS[names[fg]], float), np.array(COLOURS[names[bg]], float)
        small = ink[..., None] * fg_rgb + (1.0 - ink[..., None]) * bg_rgb
        image = Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        caption = f"a handwritten {NUMBER_WORDS[label]} in {names[fg]} on a {names[bg]} background"
        yield caption, image, {"label": label, "foreground": names[fg], "background": names[bg], "source_index": source}


def write_digit_shards(directory, count: int, size: int, samples_per_shard: int, seed: int = 0,
                       metadata: Callable[[dict], dict] = lambda meta: meta):
    """`count` digits written straight into WebDataset shards in the project's contract (no img2dataset:
    the demo teacher's own data, tests, benchmarks); `metadata` maps each digit's metadata to what is stored."""
    from addpipe.shards import ShardSample, write_shards

    samples = (ShardSample(f"{i:06d}", image, caption, metadata(meta))
               for i, (caption, image, meta) in enumerate(digit_images(count, size, seed)))
    write_shards(samples, directory, samples_per_shard)
    return directory
