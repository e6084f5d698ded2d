"""The demo chain: its learned judges (content classifier, DINOv2-architecture backbone, judge raters) and a
shortened `addpipe demo` run end to end through the CLI, then rerun to show it resumes without duplicating."""

from __future__ import annotations

import io
import json
import math
import random
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addpipe.pipeline.demo import FIELDS, PROMPT_PATTERN, DemoSettings, teacher_shards
from conftest import TINY_CONFIG
from test_train import cli


@pytest.fixture(scope="module")
def labelled_digits(tmp_path_factory) -> str:
    return teacher_shards(tmp_path_factory.mktemp("digits"), DemoSettings(teacher_images=900))


def shard_images(pattern: str) -> list[tuple[Image.Image, str]]:
    from addpipe.shards import read_samples
    from addpipe.shards import expand_shards

    out = []
    for shard in expand_shards(pattern):
        for files in read_samples(Path(shard)).values():
            out.append((Image.open(io.BytesIO(files["jpg"])).convert("RGB"), files["txt"].decode()))
    return out


@pytest.mark.slow
def test_content_classifier_learns_the_digits_and_checks_prompts(labelled_digits, tmp_path):
    from addpipe.eval.classifier import adherence, load_classifier, train_classifier
    from addpipe.eval.metrics import features_of, frechet_between, load_feature_network
    from addpipe.eval.study import degrade

    directory = train_classifier(labelled_digits, tmp_path / "classifier", FIELDS, PROMPT_PATTERN, steps=400, progress=False)
    info = json.loads((directory / "addpipe_classifier.json").read_text())
    assert info["holdout_accuracy"]["digit"] >= 0.8 and info["holdout_accuracy"]["background"] >= 0.9
    classifier = load_classifier(directory)
    assert classifier.requested("a handwritten seven in red on a blue background") == {"digit": "seven", "ink": "red", "background": "blue"}
    assert classifier.requested("a photo of a cat") == {}

    samples = shard_images(labelled_digits)[-200:]
    images, captions = [s[0] for s in samples], [s[1] for s in samples]
    right = adherence(classifier, images, captions)
    assert right["counted"] == 200 and right["digit"] >= 0.8 and right["all"] >= 0.6
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    wrong = [re.sub(r"handwritten (\w+)", lambda m: "handwritten " + words[(words.index(m.group(1)) + 3) % 10], c) for c in captions]
    assert adherence(classifier, images, wrong)["digit"] <= 0.2

    network = load_feature_network(f"classifier:{directory}")
    features = features_of(images, network)
    assert features.shape == (200, 64)
    same = frechet_between(features[:100], features[100:])
    degraded = features_of([degrade(image, i) for i, image in enumerate(images[:100])], network)
    assert frechet_between(degraded, features[100:]) > 2 * same  # 100 vs 100 in 64-d: the same-distribution FD is biased high


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_classifier_metrics_on_a_gpu_match_the_cpu(labelled_digits, tmp_path):
    """`addpipe eval metrics --classifier` on a GPU: images must follow the classifier to its device (they did not)."""
    from addpipe.eval.classifier import adherence, load_classifier, train_classifier
    from addpipe.eval.metrics import features_of, load_feature_network

    directory = train_classifier(labelled_digits, tmp_path / "classifier", FIELDS, PROMPT_PATTERN, steps=50, progress=False)
    samples = shard_images(labelled_digits)[:64]
    images, captions = [s[0] for s in samples], [s[1] for s in samples]
    on_cpu, on_gpu = load_classifier(directory, "cpu"), load_classifier(directory, "cuda")
    gpu, cpu = adherence(on_gpu, images, captions), adherence(on_cpu, images, captions)
    assert gpu.keys() == cpu.keys() and all(abs(gpu[k] - cpu[k]) <= 1 / 32 for k in cpu)  # at most a borderline image flips
    cpu_features = features_of(images, load_feature_network(f"classifier:{directory}", "cpu"))
    gpu_features = features_of(images, load_feature_network(f"classifier:{directory}", "cuda"))
    assert np.allclose(gpu_features, cpu_features, atol=1e-3)


@pytest.mark.slow
def test_dinov2_backbone_trains_on_shards_and_loads_as_the_discriminator_does(labelled_digits, tmp_path):
    from transformers import Dinov2Model

    from addpipe.backbone import train_dinov2
    from addpipe.train.methods.add.config import DiscriminatorConfig
    from addpipe.train.methods.add.discriminator import build_discriminator

    directory = train_dinov2(labelled_digits, tmp_path / "dino", FIELDS, steps=250, progress=False)
    info = json.loads((directory / "addpipe_backbone.json").read_text())
    assert info["holdout_accuracy"]["background"] >= 0.5  # 8 colours: chance is 12.5%
    model = Dinov2Model.from_pretrained(directory)
    assert model.config.model_type == "dinov2" and model.config.image_size == 32
    discriminator = build_discriminator(DiscriminatorConfig(feature_network=str(directory), input_size=32, num_heads=4,
                                                            projection_dim=16, virtual_batch_size=4), text_dim=32)
    # the trained weights, not a fresh init, are what the discriminator's frozen backbone holds
    for name, value in model.state_dict().items():
        torch.testing.assert_close(discriminator.feature_network.state_dict()[name], value)


def test_missing_labels_and_wrong_directories_are_named(digit_shards, tiny_dino):
    from addpipe.eval.classifier import load_classifier
    from addpipe.backbone import labelled_images

    with pytest.raises(KeyError, match=r"no label field\(s\) \['ink'\].*its json has"):
        labelled_images(str(digit_shards), ["label", "ink"], 32)
    with pytest.raises(FileNotFoundError, match="is not a content classifier"):
        load_classifier(tiny_dino)


def test_prompts_name_classes_whatever_their_case_and_clashing_classes_are_refused():
    from addpipe.eval.classifier import ContentClassifier, adherence

    classes = {"digit": ["Zero", "One", "SEVEN"], "ink": ["red", "Blue"], "background": ["blue", "RED"]}
    classifier = ContentClassifier(classes, prompt_pattern=PROMPT_PATTERN)
    assert classifier.requested("A handwritten seven in Blue on a red background") == {"digit": "SEVEN", "ink": "Blue",
                                                                                       "background": "RED"}
    image = Image.new("RGB", (32, 32))
    predicted = classifier.predict([image])
    prompt = f"a handwritten {predicted['digit'][0].lower()} in {predicted['ink'][0].upper()} on a {predicted['background'][0]} background"
    assert adherence(classifier, [image], [prompt]) == {"counted": 1, "all": 1.0, "digit": 1.0, "ink": 1.0, "background": 1.0}
    with pytest.raises(ValueError, match="differ only in case"):
        ContentClassifier({"ink": ["red", "Red"]})


def test_judge_choice_follows_the_logistic_rule():
    from addpipe.eval.judge import choose

    rng = random.Random(0)
    assert choose(0.50, 0.505, rng, temperature=0.05, tie_margin=0.01) == "tie"
    for difference in (0.02, 0.05, 0.1):
        draws = [choose(0.5 + difference, 0.5, rng, temperature=0.05, tie_margin=0.01) for _ in range(4000)]
        expected = 1 / (1 + math.exp(-difference / 0.05))
        assert abs(draws.count("left") / 4000 - expected) < 0.03
    assert all(choose(0.2, 0.9, rng, 1e-3, 0.01) == "right" for _ in range(50))


@pytest.mark.slow
def test_shortened_demo_runs_the_whole_chain_and_resumes(tmp_path):
    out = tmp_path / "demo_out"  # the README's default, so configs/tiny.yaml's paths find it below
    args = ["demo", "--images", "120", "--steps", "4", "--prompts", "4", "--judges", "2", "--clip-steps", "20",
            "--backbone-steps", "30", "--classifier-steps", "30"]
    result = cli(*args, cwd=tmp_path)
    assert "demo finished" in result.stdout
    assert "--resume" not in result.stderr  # a fresh run says nothing about resuming
    summary = json.loads((out / "demo_summary.json").read_text())

    # prep: every URL row has one fate; the planted bad rows got theirs; the shards hold exactly the kept samples
    prep = summary["prep"]
    assert prep["input_rows"] == 120 and sum(prep["reasons"].values()) == 120
    assert prep["reasons"]["failed_to_download: HTTP Error 404: Not Found"] == 3        # rows 39, 79, 119
    assert prep["reasons"]["failed_to_resize: Image decoding error"] == 2                 # rows 49, 99: truncated
    assert prep["reasons"]["exact_duplicate"] == 1                                        # row 59 copies row 58
    kept = shard_samples(out / "prep" / "shards")
    assert len(kept) == prep["kept"] and all(set(FIELDS) <= set(meta) for meta in kept)
    # the curation judged against what the web planted: row 59 copies 58 byte for byte, row 69 re-encodes 62
    check = summary["curation_check"]
    assert json.loads((out / "planted.json").read_text()) == {"exact_copy": {"59": 58}, "reencoding": {"69": 62}}
    assert check["dedup"]["exact_copy"]["drops"] == 1 and check["dedup"]["exact_copy"]["precision"] == 1.0
    reencoding = check["dedup"]["reencoding"]
    assert reencoding["planted"] == 1 and reencoding["drops"] == prep["reasons"].get("near_duplicate", 0)
    assert 0 <= check["caption_separation"]["auc"] <= 1 and json.loads((out / "models" / "clip" / "DONE").read_text())["steps"] == 20

    # models and training
    assert (out / "models" / "dinov2" / "config.json").is_file() and (out / "models" / "classifier" / "classifier.pt").is_file()
    assert (out / "run" / "student" / "addpipe_student.json").is_file()
    assert any((out / "run" / "checkpoints").iterdir())

    # generation: every arm drew every prompt, and the files exist
    generations = [json.loads(line) for line in (out / "study" / "generations.jsonl").read_text().splitlines()]
    arms = {"teacher-50", "teacher-4", "add-1", "add-2", "add-4"}
    assert len(generations) == 5 * 4 and {g["arm"] for g in generations} == arms
    assert all((out / "study" / g["image"]).is_file() for g in generations)
    metrics = summary["metrics"]["arms"]
    assert set(metrics) == arms and all(np.isfinite(m["frechet_distance"]) and "all" in m["adherence"] for m in metrics.values())

    # the real digits scored as the floor of the reproduction table are exactly those the study's prompts describe
    from addpipe.pipeline.demo import held_out_digits, real_reference

    prompts = (out / "study" / "prompts.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[0] for line in prompts] == [caption for caption, _, _ in held_out_digits(4, DemoSettings().resolution, 0)]
    from addpipe.shards import shard_pattern

    real = real_reference(DemoSettings(out=str(out), prompts=12), shard_pattern(sorted((out / "prep" / "shards").glob("*.tar"))),
                          out / "models" / "classifier", 0)
    assert np.isfinite(real["frechet_distance"]) and 0 <= real["adherence"] <= 1
    assert real["samples"]["generated"] == 12 and real["samples"]["reference"] == prep["kept"]
    for name in ("frechet_distance", "fd_infinity", "kid", "precision", "recall", "adherence"):  # each inside its interval
        assert real["intervals"][name][0] <= real[name] <= real["intervals"][name][1], name

    # votes: each judge answered both questions on every pair of its queue, through the server into the database
    votes_before = vote_rows(out)
    quotas = dict(sqlite3.connect(out / "study" / "votes.db").execute("select name, quota from raters").fetchall())
    assert set(quotas) == {"judge-001", "judge-002"}
    per_rater = {}
    for rater, _pair, _question in votes_before:
        per_rater[rater] = per_rater.get(rater, 0) + 1
    assert per_rater == {name: 2 * quota for name, quota in quotas.items()}

    # report: the HTML page exists, every image it shows is there, no Markdown leaks, the study report is a link
    page = (out / "report.html").read_text()
    assert "Pairwise study" in page and "Data curation" in page and "real digits of these prompts" in page
    sources = re.findall(r'<img class="\w+" src="([^"]+)"', page)
    assert "demo_grid.png" in sources and len(sources) >= 6
    assert all((out / src).is_file() for src in sources), sources
    text = re.sub(r"<[^>]+>", "", page)
    assert "**" not in text and "`" not in text and "](" not in text
    assert '<a href="study/report/report.html">' in page and "precision" in page
    assert f"on the study's {summary['judging']['pairs']} image pairs" in page
    with Image.open(out / "demo_grid.png") as grid:  # 4 rows x 6 prompts, upscaled to be seen
        assert grid.width >= 6 * 128 and grid.height >= 4 * 128

    # a rerun resumes: nothing is generated, voted or downloaded twice, and the timings stay the first run's
    cli(*args, cwd=tmp_path)
    assert vote_rows(out) == votes_before
    assert len((out / "study" / "generations.jsonl").read_text().splitlines()) == 20
    rerun = json.loads((out / "demo_summary.json").read_text())
    assert rerun["prep"] == prep and rerun["seconds"] == summary["seconds"]
    assert set(rerun["reused"]) == set(summary["seconds"]) and not summary["reused"]
    assert "This run reused: prep" in (out / "report.md").read_text()

    # the follow-up the config promises: configs/tiny.yaml trains on what the demo wrote, from the same directory
    cli("train", "--config", str(TINY_CONFIG), "steps=2", "checkpoint.every=2", cwd=tmp_path)
    assert (tmp_path / "runs" / "tiny" / "student" / "addpipe_student.json").is_file()

    # `addpipe eval judge` adds a third judge to the same study: only its votes are new
    result = cli("eval", "judge", "--study", str(out / "study"), "--classifier", str(out / "models" / "classifier"), "--judges", "3")
    assert "judge-003" in result.stdout
    added = sorted(set(vote_rows(out)) - set(votes_before))
    quota = dict(sqlite3.connect(out / "study" / "votes.db").execute("select name, quota from raters").fetchall())["judge-003"]
    assert {row[0] for row in added} == {"judge-003"} and len(added) == 2 * quota


def shard_samples(directory: Path) -> list[dict]:
    from addpipe.shards import read_samples

    return [json.loads(files["json"]) for tar in sorted(directory.glob("*.tar")) for files in read_samples(tar).values()]


def vote_rows(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "study" / "votes.db") as db:
        return sorted(db.execute("select raters.name, votes.pair_id, votes.question from votes "
                                 "join raters on raters.id = votes.rater_id").fetchall())


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_teacher_pretraining_trains_the_text_encoder_on_caption_tokens_only(labelled_digits, tmp_path, train_text_encoder):
    """The text encoder learns with the UNet: rows of caption tokens move, rows of never-seen tokens stay
    bit-identical (no weight decay on the vocabulary), and the saved pipeline holds the trained encoder."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from addpipe.train.teacher import pretrain_teacher
    from addpipe.train.tiny import build_tiny_pipeline

    directory = build_tiny_pipeline(tmp_path / "teacher", "sd", latent_size=16)
    before = CLIPTextModel.from_pretrained(directory / "text_encoder").state_dict()
    pretrain_teacher(directory, labelled_digits, 32, vae_steps=2, unet_steps=3, batch_size=8, progress=False,
                     train_text_encoder=train_text_encoder)
    after = StableDiffusionPipeline.from_pretrained(directory).text_encoder.state_dict()
    table = "embeddings.token_embedding.weight"
    moved = set(torch.nonzero((after[table] != before[table]).any(dim=1)).flatten().tolist())
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    captions = [text for _, text in shard_images(labelled_digits)] + [""]
    seen = {token for ids in tokenizer(captions, padding="max_length", max_length=16, truncation=True).input_ids for token in ids}
    if train_text_encoder:
        assert moved and moved <= seen  # only rows of tokens the captions use move
        assert not torch.equal(after["encoder.layers.0.mlp.fc1.weight"], before["encoder.layers.0.mlp.fc1.weight"])
    else:
        assert all(torch.equal(after[name], before[name]) for name in before)


def test_reproduction_ablates_the_weightings_the_config_does_not_use_and_checks_targets_per_seed(tmp_path):
    from addpipe.pipeline.demo import CONFIG
    from addpipe.eval.generate import Arm
    from addpipe.pipeline.reproduce import (arms_for, check_targets, d2g_variants, order, summarise, variants,
                                            write_table)

    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.read_text().replace("weighting: ", "weighting: sds  # was ", 1))
    found = variants(config)
    assert found["add"] == [] and found["adversarial-only"] == ["distill.distillation=false"]
    assert {name for name in found if name in ("exponential", "sds", "nfsd")} == {"exponential", "nfsd"}
    assert "student.lora.rank=16" in found["lora"]
    # the LoRA student is evaluated as its adapters on the teacher, loaded by diffusers, at 1, 2 and 4 steps
    students = {name: tmp_path / name / "student" for name in found}
    arms = {Arm.parse(text).name: Arm.parse(text) for text in arms_for(tmp_path / "teacher", students)}
    assert [(arms[f"lora-{n}"].source, arms[f"lora-{n}"].lora, arms[f"lora-{n}"].steps) for n in (1, 2, 4)] == [
        (str(tmp_path / "teacher"), str(tmp_path / "lora" / "student_lora"), n) for n in (1, 2, 4)]
    assert "lora-1" in arms and "distillation-only-1" in arms and "distillation-only-2" not in arms
    assert sorted(arms, key=order)[:10] == ["teacher-1", "teacher-2", "teacher-4", "teacher-50", "add-1", "add-2",
                                            "add-4", "lora-1", "lora-2", "lora-4"]

    def arm(fid, adherence=1.0):
        return {"frechet_distance": fid, "adherence": {"all": adherence}, "steps": 1, "latency_median_s": 0.01}

    arms = {"teacher-1": arm(200), "teacher-4": arm(80), "add-1": arm(100), "add-2": arm(99), "add-4": arm(90, 0.94),
            "distillation-only-1": arm(101), "adversarial-only-1": arm(150)}
    targets = check_targets(arms)
    assert targets["1-step student FID <= 0.5 x teacher 1-step FID"]["met"]            # 100 <= 0.5 * 200
    assert targets["1-step student beats distillation-only"]["value"] == pytest.approx(100 / 101)
    assert targets["1-step student beats adversarial-only"]["met"]
    assert targets["2-step student FID <= 1.25 x teacher 4-step FID"]["met"] is (99 <= 100)
    assert not targets["student adherence >= 95% (worst of 1/2/4 steps)"]["met"]         # the 4-step arm's 0.94
    assert not targets["stretch: 1-step student FID <= teacher 4-step FID"]["met"]
    other = dict(arms, **{"add-1": arm(120)})
    summary = summarise({0: {"metrics": {"arms": arms}, "targets": targets, "real": {"frechet_distance": 70, "adherence": 1.0}},
                         1: {"metrics": {"arms": other}, "targets": check_targets(other),
                             "real": {"frechet_distance": 80, "adherence": 0.9}}})
    assert summary["arms"]["add-1"]["fid_mean"] == pytest.approx(110)
    assert summary["targets"]["1-step student FID <= 0.5 x teacher 1-step FID"]["met"] == {0: True, 1: False}
    assert summary["real"]["fid"] == [70, 80] and summary["real"]["fid_mean"] == pytest.approx(75)
    assert summary["real"]["adherence_mean"] == pytest.approx(0.95)
    for arm_summary in summary["arms"].values():
        arm_summary["guidance"] = 0.0
    table = write_table(tmp_path, summary).read_text()
    assert "| real images of the prompts |  |  |  | 75.00 ± 7.07 | 70.00, 80.00 |  |  |  |  | 95.0% |  |" in table
    assert (tmp_path / "reproduction_fid.png").is_file()
    # Diffusion2GAN: its two runs on the pairs, its targets, and its comparisons reported without a verdict
    runs = d2g_variants(tmp_path / "pairs", tmp_path / "lpips.pth")
    assert "method=diffusion2gan" in runs["d2g"] and runs["d2g-regression"] == runs["d2g"] + ["d2g.adversarial=false"]
    with_d2g = dict(arms, **{"d2g-1": arm(90), "d2g-regression-1": arm(120)})
    found = check_targets(with_d2g)
    assert found["1-step D2G FID <= 0.5 x teacher 1-step FID"]["met"]                    # 90 <= 0.5 * 200
    assert found["1-step D2G beats its regression-only ablation"]["met"]
    assert found["reported: 1-step D2G FID / 1-step ADD FID"] == {"value": 0.9, "target": "(reported)", "met": None}
    summary = summarise({0: {"metrics": {"arms": with_d2g}, "targets": found}})
    for arm_summary in summary["arms"].values():
        arm_summary["guidance"] = 0.0
    table = write_table(tmp_path, {**summary, "cost": {"ODE pairs": "1200 pairs"}}).read_text()
    assert "| reported: 1-step D2G FID / 1-step ADD FID | (reported) | 0.900 | |" in table
    assert "| 1-step D2G beats its regression-only ablation | < 1 | 0.750 | yes |" in table
    assert "| ODE pairs | 1200 pairs |" in table

    # on KID a target holds when the upper end of the ratio's interval meets it: [low_a / high_b, high_a / low_b]
    def kid_arm(fid, kid, low, high):
        return {**arm(fid), "kid": kid, "intervals": {"kid": [low, high]}}

    with_kid = {"teacher-1": kid_arm(200, 0.040, 0.030, 0.050), "teacher-4": kid_arm(80, 0.010, 0.006, 0.014),
                "add-1": kid_arm(100, 0.012, 0.010, 0.014), "add-2": kid_arm(99, 0.011, 0.0, 0.02),
                "add-4": kid_arm(90, 0.009, 0.007, 0.011), "distillation-only-1": kid_arm(101, 0.013, 0.011, 0.015),
                "adversarial-only-1": kid_arm(150, 0.030, 0.020, 0.040)}
    found = check_targets(with_kid)
    half = found["1-step student KID <= 0.5 x teacher 1-step KID"]
    assert half["value"] == pytest.approx(0.3) and half["interval"] == pytest.approx([0.010 / 0.050, 0.014 / 0.030])
    assert half["met"] and found["1-step student FID <= 0.5 x teacher 1-step FID"]["met"]
    # overlapping intervals do not beat: 0.014 > 0.011, though the point values order the arms
    assert not found["1-step student beats distillation-only (on KID)"]["met"]
    assert found["1-step student beats distillation-only"]["met"]                         # FID 100 < 101
    assert found["1-step student beats adversarial-only (on KID)"]["met"]                 # 0.014 < 0.020
    assert found["2-step student KID <= 1.25 x teacher 4-step KID"]["interval"][1] == pytest.approx(0.02 / 0.006)
    assert found["stretch: 1-step student KID <= teacher 4-step KID"]["interval"][1] == pytest.approx(0.014 / 0.006)
    # a denominator whose interval reaches 0 (not told apart from the reference): the upper end is infinite, not met
    zero = check_targets(dict(with_kid, **{"teacher-4": kid_arm(80, 0.001, -0.002, 0.004)}))
    assert zero["stretch: 1-step student KID <= teacher 4-step KID"]["interval"][1] == float("inf")
    assert not zero["stretch: 1-step student KID <= teacher 4-step KID"]["met"]
    summary = summarise({0: {"metrics": {"arms": {name: dict(entry, guidance=0.0) for name, entry in with_kid.items()}},
                             "targets": found}})
    assert summary["arms"]["add-1"]["kid_intervals"] == [[0.010, 0.014]]
    table = write_table(tmp_path, summary).read_text()
    assert "| 1-step student KID <= 0.5 x teacher 1-step KID | <= 0.5 | 0.300 [0.200, 0.467] | yes |" in table
    assert "12.00 [10.00, 14.00]" in table  # add-1's KID x 10^3 with its interval
    # with the study's features the KID targets are judged on the paired margin, over the prompts both arms drew
    rng = np.random.default_rng(0)
    reference, base = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    study = tmp_path / "study"
    study.mkdir()
    np.savez(study / "features.npz", reference=reference, **{
        "features::add-1": base, "prompt_ids::add-1": np.arange(300),
        "features::teacher-1": base[:200] + 2.0, "prompt_ids::teacher-1": np.arange(200)})  # drawn on 200 prompts only
    paired = check_targets(with_kid, study)["1-step student KID <= 0.5 x teacher 1-step KID"]
    assert paired["pairs"] == 200 and paired["margin"][1] < 0 and paired["met"] and "interval" not in paired
    assert "margin" not in check_targets(with_kid, tmp_path / "nowhere")["1-step student KID <= 0.5 x teacher 1-step KID"]


def test_demo_refuses_a_device_name_before_any_work():
    with pytest.raises(ValueError, match="--device 'gpu' is not a torch device"):
        DemoSettings(device="gpu")
    assert DemoSettings(device="cuda:1").device == "cuda:1"  # named, not required to exist until used
