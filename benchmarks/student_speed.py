"""One-step ADD student against the 50-step guided teacher: wall-clock per image and UNet evaluations,
measured side by side in one run (alternating, same prompts and noise) so machine noise hits both alike.

    .venv/bin/python benchmarks/student_speed.py --demo demo_out [--images 40] [--device cpu]

`--demo` is a finished `addpipe demo` directory (its teacher and run/student are used). Both sides run
through diffusers pipelines loaded with `from_pretrained`, as `addpipe eval generate` runs them. UNet
evaluations are counted with a forward hook: calls, and images through the UNet (classifier-free guidance
doubles the batch). Append the output to benchmarks/RESULTS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from addpipe.eval.generate import Arm, arm_call_kwargs, initial_latents, load_arm_pipeline  # noqa: E402
from addpipe.pipeline.demo import GRID_PROMPTS  # noqa: E402
from addpipe.devices import resolve_device  # noqa: E402


class UNetCounter:
    def __init__(self, unet):
        self.calls = self.images = 0
        unet.register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.calls += 1
        self.images += args[0].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("demo_out"))
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    summary = json.loads((args.demo / "demo_summary.json").read_text())
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    arms = {"teacher 50 steps, cfg 3": Arm("teacher", summary["teacher"], steps=50, guidance=3.0, scheduler="ddim"),
            "student 1 step": Arm("student", summary["student"], steps=1)}
    runs = {}
    for label, arm in arms.items():
        pipe = load_arm_pipeline(arm, device, dtype)
        runs[label] = (pipe, arm_call_kwargs(arm), UNetCounter(pipe.unet), [])
    resolution = summary["settings"]["resolution"]
    for index in range(args.images + 1):
        prompt = GRID_PROMPTS[index % len(GRID_PROMPTS)]
        for label, (pipe, kwargs, counter, times) in runs.items():
            latents = initial_latents(pipe, index, resolution).to(device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            pipe(prompt, latents=latents, height=resolution, width=resolution, output_type="pil", **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index:  # the first image of each pays for lazy initialisation
                times.append(time.perf_counter() - started)
            else:
                counter.calls = counter.images = 0
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, device {device}, {args.images} images each, {resolution} px")
    medians = {}
    for label, (_, _, counter, times) in runs.items():
        medians[label] = statistics.median(times)
        print(f"{label:>24}: median {medians[label] * 1000:8.2f} ms/image, UNet calls/image {counter.calls / args.images:5.1f}, "
              f"UNet images/image {counter.images / args.images:5.1f}")
    teacher, student = medians["teacher 50 steps, cfg 3"], medians["student 1 step"]
    print(f"wall-clock ratio teacher/student: {teacher / student:.1f}x")


if __name__ == "__main__":
    main()
