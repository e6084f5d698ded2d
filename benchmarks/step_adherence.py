"""Which sampling step loses the requested content? Follow a student's few-step trajectory and classify the x0
it predicts after every step.

    .venv/bin/python benchmarks/step_adherence.py --classifier demo_out/models/classifier \
        --student add=demo_out/full/seed0/add/student \
        --student distillation-only=demo_out/full/seed0/distillation-only/student [--prompts 200] [--seed 0]

For each student and each schedule (default: 1, 2, 3 and 4 evenly spaced steps, the sampler `addpipe sample` runs),
the table gives the share of images whose x0 after step k shows the requested digit (and all three fields), and how
many images that were right after the first step are wrong at the end ("lost") or the reverse ("gained"). Prompts
are the demo's held-out prompts for `--seed` (pipeline.demo.write_prompts), the noise a seeded CPU generator's, so
two students are compared on the same inputs. Writes step_adherence.{md,json} into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from addpipe.eval.classifier import load_classifier  # noqa: E402
from addpipe.eval.generate import load_prompts  # noqa: E402
from addpipe.pipeline.demo import write_prompts  # noqa: E402
from addpipe.train.models import encode_prompts, vae_decode  # noqa: E402
from addpipe.train.sampling import load_student, sample_trajectory, student_timesteps  # noqa: E402


def to_images(components, x0: torch.Tensor) -> list[Image.Image]:
    pixels = ((vae_decode(components, x0) + 1.0) / 2.0).clamp(0.0, 1.0)
    return [Image.fromarray((p.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")) for p in pixels]


@torch.no_grad()
def follow(student: str, prompts: list[str], classifier, step_counts: list[int], seed: int) -> dict:
    components, schedule, info = load_student(student, torch.device("cpu"))
    denoiser = components.family.denoiser(components.unet, encode_prompts(components, prompts, "cpu"))
    size = int(components.unet.config.sample_size)  # the latent size the student was exported for
    shape = (len(prompts), components.vae.config.latent_channels, size, size)
    wanted = [classifier.requested(p) for p in prompts]
    result = {}
    for count in step_counts:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
        timesteps = student_timesteps(count, info["num_train_timesteps"])
        trajectory = sample_trajectory(denoiser, schedule, noise, timesteps,
                                       lambda _: torch.randn(shape, generator=generator))
        digit_ok, all_ok = [], []
        for x0 in trajectory:
            predicted = classifier.predict(to_images(components, x0))
            digit_ok.append([predicted["digit"][i] == w["digit"] for i, w in enumerate(wanted)])
            all_ok.append([all(predicted[f][i] == w[f] for f in w) for i, w in enumerate(wanted)])
        first, last = digit_ok[0], digit_ok[-1]
        result[str(count)] = {"timesteps": timesteps,
                              "digit_after_step": [sum(ok) / len(ok) for ok in digit_ok],
                              "all_fields_after_step": [sum(ok) / len(ok) for ok in all_ok],
                              "digit_lost": sum(a and not b for a, b in zip(first, last)),
                              "digit_gained": sum(b and not a for a, b in zip(first, last))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="append", required=True, help="NAME=DIR of an exported student")
    parser.add_argument("--classifier", required=True, help="the demo's content classifier directory")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="step_adherence")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    students = dict(s.split("=", 1) for s in args.student)
    for name, directory in students.items():
        if not Path(directory).is_dir():
            raise SystemExit(f"--student {name}={directory}: no such directory")
    classifier = load_classifier(args.classifier)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = [p.text for p in load_prompts(str(write_prompts(Path(tmp) / "prompts.tsv", args.prompts, args.seed)))]
    results = {name: follow(directory, prompts, classifier, args.steps, args.seed)
               for name, directory in students.items()}

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [f"Requested digit in the x0 predicted after each sampling step ({len(prompts)} held-out prompts, seed "
             f"{args.seed}, {machine})", "",
             "| student | timesteps | digit after step 1, 2, ... | all fields after each step | lost / gained vs step 1 |",
             "|---|---|---|---|---|"]
    for name, per_count in results.items():
        for entry in per_count.values():
            lines.append(f"| {name} | {entry['timesteps']} | " + ", ".join(f"{v:.3f}" for v in entry["digit_after_step"])
                         + " | " + ", ".join(f"{v:.3f}" for v in entry["all_fields_after_step"])
                         + f" | {entry['digit_lost']} / {entry['digit_gained']} |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_adherence.md").write_text(table)
    (out / "step_adherence.json").write_text(json.dumps(
        {"machine": machine, "seed": args.seed, "prompts": len(prompts), "students": students, "results": results}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
