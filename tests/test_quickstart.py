"""The README's "Your model on your cluster" block, run command by command on the tiny models, so a renamed option or
a command that no longer works breaks this test rather than a user's first hour.

What is substituted, and why: the user's paths become the session's tiny models and temporary directories; the
curation and the metrics get the tiny CLIP and the tiny DINOv2 (no real weights are reachable offline); the prompts
are the bundled set's first four (PartiPrompts comes from the network). Left to their own tests: the SLURM submissions
(the cluster tests submit the same commands) and `eval serve`, which serves until stopped (the server tests)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CONFIG, run_cli

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The commands of the README's quickstart block: continuations joined, comments dropped, `&&` chains split."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Your model on your cluster")
    block = text[text.index("```bash\n", start) + 8: text.index("```", text.index("```bash\n", start) + 8)]
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split("  # ")[0].strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split("&&")]
    return commands


def test_the_readme_quickstart_runs_on_the_tiny_models(tiny_sd, tiny_dino, tiny_student, tmp_path):
    from addpipe.dataprep.digits import digit_images
    from addpipe.dataprep.tiny import build_tiny_aesthetic, build_tiny_clip
    from ldm_checkpoint import write_sd_single_file

    photos = tmp_path / "my_photos"
    photos.mkdir()
    for index, (caption, image, _) in enumerate(digit_images(24, size=64, seed=1)):
        image.save(photos / f"{index:03d}.png")
        (photos / f"{index:03d}.txt").write_text(caption)
    clip = build_tiny_clip(tmp_path / "clip", embed_dim=32, image_size=32)
    tiny_curation = {"embed.model": clip["model"], "embed.model_config": clip["model_config"],
                     "embed.pretrained": clip["pretrained"], "filter.aesthetic_weights": build_tiny_aesthetic(
                         tmp_path / "aesthetic.pth", 32), "filter.min_aesthetic": "null",
                     "filter.min_clip_similarity": "null", "filter.min_resolution": 32, "download.image_size": 32}
    config = tmp_path / "my_config.yaml"  # the user's config: configs/tiny.yaml with the tiny DINOv2
    config.write_text(TINY_CONFIG.read_text().replace("demo_out/models/dinov2", str(tiny_dino)))
    finetune = tmp_path / "my-finetune.safetensors"  # the tiny teacher as one file in the original layout
    write_sd_single_file(tiny_sd, finetune)
    paths = {"configs/sdxl_add.yaml": str(config), "/models/my-sdxl": str(tmp_path / "my-sdxl"),
             "my-sdxl-finetune.safetensors": str(finetune), "stabilityai/stable-diffusion-xl-base-1.0": str(tiny_sd),
             "/data/my_photos": str(photos),
             "/data/curated": str(tmp_path / "curated"), "runs/sdxl_add/student": str(tiny_student),
             "studies/mine": str(tmp_path / "study"), "fox.png": str(tmp_path / "fox.png")}
    extra = {"fetch": [arg for key, value in tiny_curation.items() if key.startswith(("embed.pretrained", "filter.aes"))
                       for arg in ("--prep-set", f"{key}={value}")],
             "prep": [arg for key, value in tiny_curation.items() for arg in ("--set", f"{key}={value}")],
             "eval generate": ["--limit", "4"], "eval metrics": ["--features", f"dinov2:{tiny_dino}"]}
    ran = []
    for command in readme_commands():
        words = shlex.split(command)
        assert words[0] == "addpipe", command
        if words[1:3] == ["slurm", "train"] and "--dry-run" not in words or words[1:3] == ["eval", "serve"]:
            continue  # submissions and the serving loop: see the module docstring
        args = words[1:]
        for user_path in sorted(paths, key=len, reverse=True):  # wherever it appears: alone, after `key=`, before `:`
            args = [arg.replace(user_path, paths[user_path]) for arg in args]
        if args[:2] == ["eval", "generate"]:
            args[args.index("--prompts") + 1] = "bundled"
        key = next((k for k in extra if args[:len(k.split())] == k.split()), None)
        args += extra.get(key, [])
        if args[:2] == ["slurm", "prep"]:  # off a cluster: its dry run renders the three jobs for the table
            table = tmp_path / "my_table.parquet"
            shutil.copy(tmp_path / "curated" / "input" / "local_images.parquet", table)
            args = [a if a != "/data/my_table.parquet" else str(table) for a in args] + ["--dry-run"]
        if args[0] == "prep":  # img2dataset's workers: a process of its own
            result = subprocess.run([sys.executable, "-m", "addpipe.pipeline", *args], capture_output=True, text=True,
                                    timeout=600)
        else:
            result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n-> {args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        ran.append(" ".join(words[:3]))
    assert len(ran) == 10, ran  # all but the submission and the serving loop
    assert ran[0] == "addpipe convert my-sdxl-finetune.safetensors"  # the converted teacher is what the rest used
    assert (tmp_path / "fox.png").is_file() and (tmp_path / "study" / "metrics.json").is_file()
    assert (tmp_path / "study" / "invites.csv").is_file()
