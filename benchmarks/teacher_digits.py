"""Does a teacher draw the digit the prompt asks for? Adherence on held-out prompts, and a picture of why not.

    .venv/bin/python benchmarks/teacher_digits.py --classifier demo_out/models/classifier \
        --teacher before=OLD_TEACHER_DIR --teacher after=pipeline/assets/digits_teacher \
        [--prompts 200] [--steps 1 4 50] [--guidance 3] [--out benchmarks/reproduction/teacher_digits.png]

Each teacher samples the same held-out prompts (pipeline.demo.write_prompts) from the same noise with DDIM at each
step count, guidance 3, as the reproduction table's teacher arms do; the demo's content classifier reads the digit,
ink and background. The picture has one row per teacher and one column per digit "zero".."nine", all columns from
ONE noise seed: if a row shows the same shape in every column, the noise, not the prompt, picks the digit.
Append the printed table to benchmarks/RESULTS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torchvision.transforms.functional import to_tensor  # noqa: E402

from addpipe.dataprep.digits import NUMBER_WORDS  # noqa: E402
from addpipe.eval.classifier import adherence, load_classifier  # noqa: E402
from addpipe.eval.generate import Arm, initial_latents, load_arm_pipeline, load_prompts  # noqa: E402
from addpipe.pipeline.demo import write_prompts  # noqa: E402
from addpipe.train.sampling import save_grid  # noqa: E402

GRID_COLOURS = ("red", "blue")  # ink, background of every picture column: only the digit word changes


def sample(pipe, prompts: list[str], steps: int, guidance: float, resolution: int, seeds: list[int]):
    latents = torch.cat([initial_latents(pipe, seed, resolution) for seed in seeds])
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                    latents=latents).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append", required=True, help="NAME=DIR, repeatable")
    parser.add_argument("--classifier", required=True, help="a content classifier directory (addpipe demo's models/classifier)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 50])
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--noise-seed", type=int, default=0, help="the one noise seed of the picture's columns")
    parser.add_argument("--out", default="benchmarks/reproduction/teacher_digits.png")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    classifier = load_classifier(args.classifier)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = [p.text for p in load_prompts(str(write_prompts(Path(tmp) / "prompts.tsv", args.prompts, 0)))]
    picture_prompts = [f"a handwritten {word} in {GRID_COLOURS[0]} on a {GRID_COLOURS[1]} background" for word in NUMBER_WORDS]
    rows, results = [], {}
    for spec in args.teacher:
        name, source = spec.split("=", 1)
        pipe = load_arm_pipeline(Arm(name, source, scheduler="ddim"), torch.device("cpu"), torch.float32)
        results[name] = {}
        for steps in args.steps:
            start = time.perf_counter()
            images = []
            for first in range(0, len(prompts), 50):  # one noise seed per prompt, the same for every teacher
                chunk = prompts[first:first + 50]
                images += sample(pipe, chunk, steps, args.guidance, args.resolution, list(range(first, first + len(chunk))))
            scores = {k: round(v, 3) for k, v in adherence(classifier, images, prompts).items() if k != "counted"}
            results[name][steps] = scores
            print(f"{name:>10} {steps:>3} steps: {json.dumps(scores)} ({time.perf_counter() - start:.0f} s)", flush=True)
        picture = sample(pipe, picture_prompts, 50, args.guidance, args.resolution, [args.noise_seed] * len(picture_prompts))
        rows += [to_tensor(image) for image in picture]

    save_grid(torch.stack(rows), Path(args.out), rows=len(args.teacher))
    print(f"\n{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch "
          f"{torch.__version__}; {args.prompts} held-out prompts, DDIM, guidance {args.guidance:g}; picture: {args.out}")
    print("| teacher | steps | digit | ink | background | all three |\n|---|---:|---:|---:|---:|---:|")
    for name, by_steps in results.items():
        for steps, s in by_steps.items():
            print(f"| {name} | {steps} | {s['digit']:.3f} | {s['ink']:.3f} | {s['background']:.3f} | {s['all']:.3f} |")


if __name__ == "__main__":
    main()
