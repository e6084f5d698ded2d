"""`addpipe eval` end to end on a tiny random-init pipeline: paired generation (same noise for every arm),
invites, votes over HTTP, ratings and report, metrics, export."""

from __future__ import annotations

import csv
import json
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from addpipe.eval.server import create_app
from live_server import ServerThread
from conftest import run_cli
from test_train import cli


@pytest.fixture(scope="module")
def student(tiny_student):
    """The session's exported student (its quality is irrelevant here)."""
    return tiny_student


@pytest.fixture(scope="module")
def study(tiny_sd, student, tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval") / "study"
    args = ["eval", "generate", "--study", str(directory), "--prompts", "bundled", "--limit", "4", "--seed", "7",
            "--model", f"fast={tiny_sd}:steps=2:cfg=3", "--model", f"fast-copy={tiny_sd}:steps=2:cfg=3",
            "--model", f"slow={tiny_sd}:steps=4:cfg=3:scheduler=euler", "--model", f"add1={student}:steps=1",
            "--model", f"add4={student}:steps=4"]
    result = cli(*args)
    assert "5 arm(s) x 4 prompt(s)" in result.stdout
    return {"dir": directory, "args": args, "student": student}


@pytest.mark.slow  # a subprocess
def test_generation_is_paired_and_resumable(study):
    directory = study["dir"]
    lines = [json.loads(l) for l in (directory / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and {l["arm"] for l in lines} == {"fast", "fast-copy", "slow", "add1", "add4"}
    for line in lines:
        assert line["seed"] == 7 + line["prompt_id"] and line["latency_s"] > 0 and line["category"]
    for prompt_id in range(4):
        fast = np.asarray(Image.open(directory / f"images/fast/{prompt_id:05d}.png"))
        copy = np.asarray(Image.open(directory / f"images/fast-copy/{prompt_id:05d}.png"))
        slow = np.asarray(Image.open(directory / f"images/slow/{prompt_id:05d}.png"))
        assert np.array_equal(fast, copy)  # same prompt, same initial noise, same sampler: the same image
        assert not np.array_equal(fast, slow)
    assert json.loads((directory / "study.json").read_text())["arms"]["slow"]["scheduler"] == "euler"
    # the student arm runs on its trained timesteps: one step from t=999 equals the project's own sampler
    import torch

    from addpipe.train.sampling import generate, load_student
    components, schedule, _ = load_student(str(study["student"]), torch.device("cpu"))
    line = next(l for l in lines if l["arm"] == "add1" and l["prompt_id"] == 0)
    ours = generate(components.unet, components, schedule, [line["prompt"]], [999], 7, line["resolution"], torch.device("cpu"))
    ours = (ours[0] * 255).round().permute(1, 2, 0).numpy()
    theirs = np.asarray(Image.open(directory / line["image"]), dtype=np.float64)
    assert np.abs(ours - theirs).max() <= 2  # the same image up to rounding
    cli(*study["args"])  # resumable: nothing new to do
    assert len((directory / "generations.jsonl").read_text().splitlines()) == 20
    changed = run_cli("eval", "generate", "--study", str(directory), "--model", "slow=elsewhere:steps=1")
    assert changed.returncode == 2 and "already exists" in changed.stderr


@pytest.mark.slow
def test_invite_vote_rate_report_metrics_and_export(study, tiny_dino, tmp_path):
    from addpipe.dataprep.tiny import build_tiny_clip

    directory = study["dir"]
    result = cli("eval", "invite", "--study", str(directory), "--raters", "3", "--golden-fraction", "0.3")
    assert "3 invite(s)" in result.stdout
    invites = list(csv.DictReader((directory / "invites.csv").open()))
    assert len(invites) == 3 and all(row["url"].endswith(row["token"]) for row in invites)
    url = f"sqlite:///{directory / 'votes.db'}"
    with ServerThread(create_app(directory, url)) as server, httpx.Client(base_url=server.url) as client:
        for rater in invites:
            token = rater["token"]
            task = client.get("/api/next", headers={"X-Token": token}).json()
            while not task["finished"]:
                left = client.get(task["left"]).content
                slow_left = any(left == (directory / f"images/slow/{i:05d}.png").read_bytes() for i in range(4))
                slow_right = any(client.get(task["right"]).content == (directory / f"images/slow/{i:05d}.png").read_bytes() for i in range(4))
                side = "left" if slow_left and not slow_right else "right" if slow_right and not slow_left else "tie"
                body = {"pair_id": task["pair_id"], "submission_id": uuid.uuid4().hex, "answers": {"adherence": side, "quality": side}}
                assert client.post("/api/vote", json=body, headers={"X-Token": token}).status_code == 200
                task = client.get("/api/next", headers={"X-Token": token}).json()
    result = cli("eval", "elo", "--study", str(directory), "--min-golden", "0", "--bootstrap", "50")
    ratings = json.loads((directory / "ratings.json").read_text())
    combined = ratings["questions"]["combined"]
    assert combined["arms"][0] == "slow"  # every rater preferred the 4-step arm
    assert combined["bradley_terry"]["fast"]["rating"] == pytest.approx(combined["bradley_terry"]["fast-copy"]["rating"], abs=1e-6)
    assert set(ratings["questions"]) == {"adherence", "quality", "combined"}
    for name in ("report.md", "report.html", "ratings_combined.png", "winrate_quality.png", "quality_vs_latency.png"):
        assert (directory / "report" / name).stat().st_size > 200, name
    assert "| 1 | slow |" in (directory / "report/report.md").read_text()

    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(4):
        (reference / f"{i}.png").write_bytes((directory / f"images/fast/{i:05d}.png").read_bytes())
    tiny = build_tiny_clip(tmp_path / "clip")
    cli("eval", "metrics", "--study", str(directory), "--reference", str(reference), "--features", f"dinov2:{tiny_dino}",
        "--clip-model", f"{tiny['model_config']}@{tiny['pretrained']}", "--device", "cpu")
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["arms"]["fast"]["frechet_distance"] == pytest.approx(0.0, abs=1e-3)  # the reference is the fast arm itself
    assert metrics["arms"]["slow"]["frechet_distance"] > metrics["arms"]["fast"]["frechet_distance"]
    assert 0 <= metrics["arms"]["slow"]["clip_score"] <= 100 and metrics["arms"]["slow"]["steps"] == 4
    report = (directory / "report/report.md").read_text()
    assert "| arm | steps | FD | FD∞ | KID ×10³ | precision | recall | CLIP score |" in report  # 4 images: FD alone
    assert f"| fast | 2 | {metrics['arms']['fast']['frechet_distance']:.2f} [" in report

    cli("eval", "export", "--study", str(directory), "--out", str(tmp_path / "votes.csv"))
    rows = list(csv.DictReader((tmp_path / "votes.csv").open()))
    assert rows and {"rater", "arm_a", "arm_b", "question", "choice", "golden"} <= set(rows[0])


@pytest.mark.slow
def test_an_arm_on_the_first_prompts_and_metrics_with_intervals(tiny_sd, tiny_dino, tmp_path):
    """`:prompts=N` draws an expensive arm on the first N prompts only (a rerun with a larger N adds the rest); `eval
    metrics` gives every arm FD at its count, FD-infinity, KID, precision and recall, each inside its interval."""
    directory = tmp_path / "study"
    base = ["eval", "generate", "--study", str(directory), "--prompts", "bundled", "--limit", "10", "--seed", "3",
            "--model", f"all={tiny_sd}:steps=1"]
    cli(*base, "--model", f"some={tiny_sd}:steps=2:prompts=4")
    counts = lambda: {arm: sum(json.loads(l)["arm"] == arm for l in (directory / "generations.jsonl").read_text().splitlines())
                      for arm in ("all", "some")}
    assert counts() == {"all": 10, "some": 4}
    cli(*base, "--model", f"some={tiny_sd}:steps=2:prompts=9")  # more of the same arm: only the new prompts are drawn
    assert counts() == {"all": 10, "some": 9}
    bad = run_cli("eval", "generate", "--study", str(directory), "--model", f"x={tiny_sd}:prompts=0")
    assert bad.returncode == 2 and "prompts >= 1" in bad.stderr
    from addpipe.eval.generate import Arm

    with pytest.raises(ValueError, match="prompts must be an integer, got 'half'"):
        Arm.parse("x=model:prompts=half")
    assert Arm.parse("x=model:steps=4:cfg=7.5:prompts=200") == Arm("x", "model", 4, 7.5, prompts=200)

    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(10):  # the reference is the `all` arm's own images: its FD-infinity and KID sit near 0
        (reference / f"{i}.png").write_bytes((directory / f"images/all/{i:05d}.png").read_bytes())
    result = cli("eval", "metrics", "--study", str(directory), "--reference", str(reference), "--features",
                 f"dinov2:{tiny_dino}", "--resamples", "5", "--device", "cpu")
    metrics = json.loads((directory / "metrics.json").read_text())
    for arm, count in (("all", 10), ("some", 9)):
        entry = metrics["arms"][arm]
        assert entry["samples"]["generated"] == count and entry["samples"]["reference"] == 10
        for name in ("frechet_distance", "fd_infinity", "kid", "precision", "recall", "latency_median_s"):
            low, high = entry["intervals"][name]
            assert low <= entry[name] <= high, (arm, name)
        assert entry["fd_curve"]["sizes"][-1] == count
    with np.load(directory / "features.npz") as stored:  # kept for paired comparisons: rows and their prompts
        assert stored["features::some"].shape[0] == 9 and stored["prompt_ids::some"].tolist() == list(range(9))
        assert stored["reference"].shape[0] == 10
    identical = metrics["arms"]["all"]
    assert identical["frechet_distance"] == pytest.approx(0.0, abs=1e-3) and identical["precision"] == 1.0 == identical["recall"]
    assert identical["intervals"]["kid"][0] <= 0.0 <= identical["intervals"]["kid"][1]
    assert "FD@9/10" in result.stdout and "KID x1e3" in result.stdout and "[" in result.stdout
    report = (directory / "report" / "report.md").read_text()
    assert "| FD | FD∞ | KID ×10³ | precision | recall |" in report and (directory / "report" / "distances.png").is_file()
    assert run_cli("eval", "metrics", "--study", str(directory), "--reference", str(reference), "--features",
                   f"dinov2:{tiny_dino}", "--resamples", "1").returncode == 2
