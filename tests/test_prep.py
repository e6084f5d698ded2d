"""`addpipe prep` end to end against a loopback HTTP server serving real photos and every kind of bad row.

One module-scoped run downloads, embeds and scores everything with base filters only (no CLIP or
aesthetic threshold, no dedup); tests then rerun the merge step with thresholds chosen from the measured
scores, so every expected outcome is known before the run it checks.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from addpipe.dataprep.config import InputConfig
from addpipe.dataprep.dedup import near_duplicates
from addpipe.dataprep.tiny import build_tiny_aesthetic, build_tiny_clip
from image_server import (ImageServer, Route, curation_rows, digit_photo, hostile_redirect_rows, hostile_scheme_rows, jpeg,
                          png, sample_photos, serve_rows)
from conftest import REPO, run_cli
from test_train import clean_env

ADDPIPE = [sys.executable, "-m", "addpipe.pipeline"]


def base_settings(tiny: dict[str, str], aesthetic: Path) -> list[str]:
    settings = {
        "embed.model": tiny["model"], "embed.model_config": tiny["model_config"], "embed.pretrained": tiny["pretrained"],
        "embed.batch_size": 8, "filter.aesthetic_weights": str(aesthetic), "filter.min_aesthetic": "null",
        "filter.min_clip_similarity": "null", "filter.min_resolution": 100, "dedup.enabled": "false",
        "download.image_size": 64, "download.samples_per_shard": 8, "download.processes": 1, "download.threads": 8,
        "download.timeout": 3, "download.max_image_area": 2e7, "download.allowed_networks": "[127.0.0.1/32]",
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def addpipe(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(ADDPIPE + list(args), capture_output=True, text=True, env=clean_env(), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"addpipe {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tiny = build_tiny_clip(root / "clip")
    aesthetic = build_tiny_aesthetic(root / "aesthetic.pth", 32)
    local = root / "local.jpg"  # a real image on this disk: a file: URL must not reach it
    local.write_bytes(jpeg(sample_photos()[0]))
    rows = curation_rows() + hostile_scheme_rows(local) + hostile_redirect_rows(local)
    server = serve_rows(rows)
    with server:
        table = pd.DataFrame({"URL": [r.url for r in rows], "TEXT": [r.caption for r in rows], "name": [r.name for r in rows],
                              "pwatermark": [r.pwatermark for r in rows], "punsafe": [r.punsafe for r in rows]})
        table.to_parquet(root / "laion.parquet")
        settings = base_settings(tiny, aesthetic) + ["--set", "input.url_column=URL", "--set", "input.caption_column=TEXT"]
        out = root / "curated"
        result = addpipe("prep", "--urls", str(root / "laion.parquet"), "--out", str(out), *settings)
        yield {"root": root, "out": out, "rows": rows, "settings": settings, "tiny": tiny, "aesthetic": aesthetic,
               "stdout": result.stdout, "stderr": result.stderr, "server": server}


def decisions(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "shards" / "_decisions.parquet").set_index("name")


def merge(curated, *extra: str) -> dict:
    result = run_cli("prep", "merge", "--out", str(curated["out"]), *extra)  # in this process: no start-up
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads((curated["out"] / "report.json").read_text())


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_every_input_row_is_accounted_for_with_its_reason(curated):
    report = json.loads((curated["out"] / "report.json").read_text())
    rows = curated["rows"]
    assert report["input_rows"] == len(rows) and sum(report["reasons"].values()) == len(rows)
    table = decisions(curated["out"])
    for row in rows:
        expected = "kept" if row.expected in ("exact_duplicate", "near_duplicate") else row.expected  # dedup is off here
        assert table.loc[row.name, "reason"].startswith(expected), (row.name, table.loc[row.name, "reason"], expected)
    stages = {stage["stage"]: stage for stage in report["stages"]}
    assert stages["download"]["entered"] == len(rows)
    for before, after in zip(report["stages"], report["stages"][1:]):
        assert after["entered"] == before["left"]
    assert report["stages"][-1]["left"] == report["kept"]
    markdown = (curated["out"] / "report.md").read_text()
    assert "| download | %d |" % len(rows) in markdown and "caption_empty" in markdown
    for path in report["plots"].values():
        with Image.open(curated["out"] / path) as image:
            assert image.format == "PNG" and image.width > 100


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_off_a_terminal_progress_is_plain_lines(curated):
    """A SLURM log is not a terminal: img2dataset's bar would write carriage returns there (one endless line)."""
    log = curated["stdout"] + curated["stderr"]
    assert "\r" not in log
    assert "Starting the downloading" in log  # img2dataset's own plain lines still reach the log


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_urls_with_other_schemes_are_refused_counted_and_never_read(curated):
    """file:, ftp:, data:, javascript:, paths and wrapped or padded variants: a failed row each, with its reason and
    its original url, counted in the report; the local image they point at is in no shard."""
    out = curated["out"]
    hostile = [row for row in curated["rows"] if row.name.startswith("scheme-")]
    table = decisions(out)
    for row in hostile:
        assert table.loc[row.name, "reason"] == row.expected, (row.name, table.loc[row.name, "reason"])
        assert table.loc[row.name, "url"] == row.url and table.loc[row.name, "status"] == "failed_to_download"
    report = json.loads((out / "report.json").read_text())
    assert report["reasons"]["failed_to_download: scheme not allowed: file"] == 5
    assert report["reasons"]["failed_to_download: scheme not allowed: (none)"] == 4
    for scheme in ("ftp", "data", "javascript"):
        assert report["reasons"][f"failed_to_download: scheme not allowed: {scheme}"] == 1
    local = hashlib.sha256((curated["root"] / "local.jpg").read_bytes()).hexdigest()
    for directory in ("download", "shards"):
        for tar_path in (out / directory).glob("*.tar"):
            with tarfile.open(tar_path) as tar:
                names = {m.name for m in tar}
                assert not any(n.startswith(tuple(table.loc[[r.name for r in hostile], "key"])) for n in names), tar_path
                assert all(hashlib.sha256(tar.extractfile(m).read()).hexdigest() != local for m in tar if m.isfile())
    listing = pd.concat([pd.read_parquet(p) for p in (out / "shards").glob("*.parquet") if not p.name.startswith("_")])
    assert set(listing.loc[listing["name"].str.startswith("scheme-"), "status"]) == {"failed_to_download"}


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_redirects_to_other_schemes_and_loopback_addresses_are_refused_per_row_and_counted(curated):
    """A 302 to ftp:, file: or a loopback address outside download.allowed_networks: a failed row each, with its reason,
    in the shard's parquet and _stats.json and the report, never kept (the file: target's bytes are in no shard)."""
    out = curated["out"]
    hostile = [row for row in curated["rows"] if row.name.startswith("redirect-")]
    table = decisions(out)
    for row in hostile:
        assert table.loc[row.name, "reason"] == row.expected, (row.name, table.loc[row.name, "reason"])
        assert table.loc[row.name, "status"] == "failed_to_download" and table.loc[row.name, "url"] == row.url
        assert curated["server"].hits["/" + row.name] >= 1  # the first hop was fetched: the refusal is the redirect's
    download = pd.concat([pd.read_parquet(p) for p in (out / "download").glob("*.parquet")])
    errors = download.set_index("name").loc[[row.name for row in hostile], "error_message"]
    assert list(errors) == [row.expected.removeprefix("failed_to_download: ") for row in hostile]
    counted: dict[str, int] = {}
    for stats in (out / "download").glob("*_stats.json"):
        for reason, count in json.loads(stats.read_text())["status_dict"].items():
            counted[reason] = counted.get(reason, 0) + count
    assert counted["redirect refused: scheme not allowed: ftp"] == 1
    assert counted["redirect refused: scheme not allowed: file"] == 2
    assert counted["redirect refused: address not allowed: loopback"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["reasons"]["failed_to_download: redirect refused: address not allowed: loopback"] == 2
    local = hashlib.sha256((curated["root"] / "local.jpg").read_bytes()).hexdigest()
    for tar_path in (out / "shards").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            assert all(hashlib.sha256(tar.extractfile(m).read()).hexdigest() != local for m in tar if m.isfile())


def test_scheme_allow_list_reads_schemes_as_urllib_does():
    from addpipe.dataprep.config import DownloadConfig
    from addpipe.dataprep.table import refusal

    web = ["http", "https"]
    assert refusal("https://example.org/a.jpg", web) is None and refusal("HTTP://example.org/a.jpg", web) is None
    assert refusal(" <URL:file:///etc/passwd>", web) == "scheme not allowed: file"
    assert refusal("\x00file:///etc/passwd", web) == "scheme not allowed: '\\x00file'"
    assert refusal("https://example.org/a.jpg", ["http"]) == "scheme not allowed: https"
    assert refusal("", web) == refusal("a/b.jpg", web) == "scheme not allowed: (none)"
    assert DownloadConfig(allowed_schemes=[" HTTPS "]).allowed_schemes == ["https"]
    with pytest.raises(ValueError, match="allowed_schemes must name at least one"):
        DownloadConfig(allowed_schemes=[])


def test_empty_malformed_and_zero_byte_tables_fail_naming_the_file_before_any_stage(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    pd.DataFrame({"url": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)}).to_parquet(tables / "empty.parquet")
    (tables / "header-only.csv").write_text("url,caption\n")
    (tables / "zero.csv").write_bytes(b"")
    (tables / "ragged.csv").write_text("url,caption\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two,three,four\n")
    (tables / "garbage.parquet").write_bytes(os.urandom(300))
    (tables / "broken.jsonl").write_text('{"url": "http://a/1.jpg", "caption": "x"}\n{"url": \n')
    expected = {"empty.parquet": "has no rows", "header-only.csv": "has no rows", "zero.csv": "is empty (0 bytes)",
                "ragged.csv": "cannot read input file", "garbage.parquet": "cannot read input file",
                "broken.jsonl": "cannot read input file"}
    from addpipe.dataprep.config import PrepConfig
    from addpipe.dataprep.prep import run_download
    from addpipe.dataprep.table import InputError

    for name, message in expected.items():
        out = tmp_path / ("out-" + name)
        if name in ("empty.parquet", "ragged.csv"):  # through the CLI: exit 2, one line, no traceback
            result = run_cli("prep", "--urls", str(tables / name), "--out", str(out))
            assert result.returncode == 2, (name, result.stderr[-2000:])
            assert message in result.stderr and str(tables / name) in result.stderr, (name, result.stderr[-2000:])
            assert "Traceback" not in result.stderr and "img2dataset" not in result.stderr
        else:  # the same library call the CLI makes, without paying its start-up again
            with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
                run_download(PrepConfig(out=str(out), input=InputConfig(urls=str(tables / name))))
            assert str(tables / name) in str(raised.value)
        assert not out.exists(), (name, sorted(p.name for p in out.rglob("*")))


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_embeddings_use_clip_retrievals_layout_and_scores_match_their_definitions(curated):
    import open_clip

    out, tiny = curated["out"], curated["tiny"]
    open_clip.add_model_config(tiny["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(tiny["model"], pretrained=tiny["pretrained"])
    tokenizer = open_clip.get_tokenizer(tiny["model"])
    state = torch.load(curated["aesthetic"], weights_only=True)
    table = decisions(out)
    checked = 0
    for shard in sorted(table["shard"].unique()):
        img = np.load(out / "embeddings/img_emb" / f"img_emb_{shard:05d}.npy").astype(np.float32)
        txt = np.load(out / "embeddings/text_emb" / f"text_emb_{shard:05d}.npy").astype(np.float32)
        meta = pd.read_parquet(out / "embeddings/metadata" / f"metadata_{shard:05d}.parquet")
        assert len(img) == len(txt) == len(meta)
        with tarfile.open(out / "download" / f"{shard:05d}.tar") as tar:
            images = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
        for i, key in enumerate(meta["key"]):
            with torch.no_grad():
                image = Image.open(io.BytesIO(images[key])).convert("RGB")
                expected_img = torch.nn.functional.normalize(model.encode_image(preprocess(image)[None]), dim=-1)[0].numpy()
                expected_txt = torch.nn.functional.normalize(model.encode_text(tokenizer([meta["caption"][i]])), dim=-1)[0].numpy()
            np.testing.assert_allclose(img[i], expected_img, atol=2e-3)
            np.testing.assert_allclose(txt[i], expected_txt, atol=2e-3)
            row = table[table["key"] == key].iloc[0]
            assert row["clip_similarity"] == pytest.approx(float(img[i] @ txt[i]), abs=1e-5)
            # the published predictor has no activations: score = W7 W6 W4 W2 W0 e + biases, by hand
            h = img[i]
            for layer in (0, 2, 4, 6, 7):
                h = state[f"layers.{layer}.weight"].numpy() @ h + state[f"layers.{layer}.bias"].numpy()
            assert row["aesthetic"] == pytest.approx(float(h[0]), abs=1e-4)
            checked += 1
    assert checked == (table["status"] == "success").sum() >= 16


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_clip_and_aesthetic_thresholds_drop_exactly_the_rows_below_them(curated):
    table = decisions(curated["out"])
    entering = table[table["reason"] == "kept"]
    clip_cut = float(np.median(entering["clip_similarity"]))
    after_clip = entering[entering["clip_similarity"] >= clip_cut]
    aesthetic_cut = float(np.median(after_clip["aesthetic"]))
    report = merge(curated, "--set", f"filter.min_clip_similarity={clip_cut!r}", "--set", f"filter.min_aesthetic={aesthetic_cut!r}")
    result = decisions(curated["out"])
    low_clip = set(entering.index[entering["clip_similarity"] < clip_cut])
    low_aesthetic = set(after_clip.index[after_clip["aesthetic"] < aesthetic_cut])
    assert set(result.index[result["reason"] == "low_clip_similarity"]) == low_clip and low_clip
    assert set(result.index[result["reason"] == "low_aesthetic"]) == low_aesthetic and low_aesthetic
    assert report["kept"] == len(entering) - len(low_clip) - len(low_aesthetic)

    # keep-top-fraction instead of a threshold: exactly ceil(f * n) of the rows reaching the CLIP stage survive
    merge(curated, "--set", "filter.clip_keep_fraction=0.25")
    result = decisions(curated["out"])
    survivors = result[result["reason"] == "kept"]
    assert len(survivors) == int(np.ceil(0.25 * len(entering)))
    assert survivors["clip_similarity"].min() >= result.loc[result["reason"] == "below_clip_top_fraction", "clip_similarity"].max()


@pytest.fixture(scope="module")
def dedup_settings(curated):
    """A near-duplicate threshold between the near-duplicate's similarity and every other pair's, measured
    on the base run's embeddings, so the expected outcome is known before the dedup run."""
    merge(curated)  # back to the base settings of prep_config.yaml
    table = decisions(curated["out"])
    alive = table[table["reason"] == "kept"].sort_values(["shard", "key"])
    embeddings = np.concatenate([np.load(curated["out"] / "embeddings/img_emb" / f"img_emb_{s:05d}.npy")[[i]]
                                 for s, i in zip(alive["shard"], alive["embedding_index"])]).astype(np.float32)
    similarity = embeddings @ embeddings.T
    names = list(alive.index)
    near = similarity[names.index("flower-near.jpg"), names.index("flower.jpg")]
    exact = {names.index("china-copy.jpg"), names.index("china.jpg")}
    others = [similarity[i, j] for i in range(len(names)) for j in range(i) if {i, j} != exact
              and {names[i], names[j]} != {"flower-near.jpg", "flower.jpg"}]
    assert near > max(others), "the tiny CLIP must separate the near-duplicate from distinct images"
    assert table.loc["flower-near.jpg", "shard"] != table.loc["flower.jpg", "shard"]  # found across shards
    threshold = float(near + max(others)) / 2
    return ["--set", "dedup.enabled=true", "--set", f"dedup.threshold={threshold!r}", "--set", "dedup.block_size=4"]


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_exact_and_near_duplicates_are_removed_across_shards(curated, dedup_settings):
    report = merge(curated, *dedup_settings)
    result = decisions(curated["out"])
    assert set(result.index[result["reason"] == "exact_duplicate"]) == {"china-copy.jpg"}
    assert set(result.index[result["reason"] == "near_duplicate"]) == {"flower-near.jpg"}
    expected = {r.name: r.expected for r in curated["rows"]}
    assert all(result.loc[name, "reason"].startswith(reason) for name, reason in expected.items())
    assert report["kept"] == sum(r.expected == "kept" for r in curated["rows"])


@pytest.mark.slow  # on the module's prep run: a subprocess of about 25 s
def test_output_shards_follow_the_contract_and_the_trainer_reads_them(curated):
    from addpipe.train.config import DataConfig
    from addpipe.train.data import TrainingData

    merge(curated)  # the base settings: independent of what earlier tests merged
    out = curated["out"]
    table = decisions(out)
    kept = table[table["reason"] == "kept"]
    seen = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        listing = pd.read_parquet(tar_path.with_suffix(".parquet"))
        stats = json.loads(tar_path.with_name(tar_path.stem + "_stats.json").read_text())
        assert stats["count"] == len(listing) == stats["successes"] + stats["failed_to_download"] + stats["filtered"]
        assert set(listing.loc[listing["status"] == "success", "key"]) == set(kept.loc[kept["shard"] == int(tar_path.stem), "key"])
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert set(seen) == set(kept["key"])
    for name, row in kept.iterrows():
        sample = seen[row["key"]]
        meta = json.loads(sample["json"])
        assert sample["txt"].decode("utf-8") == row["caption"]
        for field in ("url", "width", "height", "original_width", "original_height", "sha256", "clip_similarity", "aesthetic", "name", "pwatermark"):
            assert field in meta, field
        assert meta["clip_similarity"] == pytest.approx(row["clip_similarity"])
        Image.open(io.BytesIO(sample["jpg"])).verify()
    assert seen[kept.loc["unicode.jpg", "key"]]["txt"].decode() == "un château près de la forêt, 東京タワー"

    data = TrainingData(DataConfig(shards=str(out / "shards"), resolution=16, batch_size=4, num_workers=0), rank=0, world_size=1)
    batch = next(iter(data))
    assert batch.pixels.shape == (4, 3, 16, 16) and set(batch.captions) <= set(kept["caption"])


def _run_until(args: list[str], marker: Path, env: dict) -> bool:
    """Start a prep run and SIGKILL its whole process group as soon as `marker` exists; -> whether it was
    killed (False: it finished first)."""
    process = subprocess.Popen(ADDPIPE + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while process.poll() is None and not marker.exists() and time.time() < deadline:
        time.sleep(0.02)
    killed = process.poll() is None
    if killed:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return killed


@pytest.mark.slow
def test_a_run_killed_at_any_stage_and_rerun_gives_identical_output(curated, dedup_settings):
    merge(curated, *dedup_settings)  # the reference: the uninterrupted run's output with these settings
    out = curated["root"] / "killed"
    args = ["prep", "--urls", str(curated["root"] / "laion.parquet"), "--out", str(out), *curated["settings"], *dedup_settings]
    env = clean_env()
    killed = [_run_until(args, out / marker, env) for marker in ("download/00001_stats.json", "scores/00001.parquet", "shards/00001.tar")]
    assert sum(killed) >= 2, killed  # the kills must really interrupt work for this test to mean anything
    assert not (out / "report.json").exists() or not killed[-1]
    addpipe(*args)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    reference = curated["out"] / "shards"
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert names == sorted(p.name for p in (out / "shards").glob("*.tar")) and names
    for name in names:
        assert digest(out / "shards" / name) == digest(reference / name), name
        a = pd.read_parquet((out / "shards" / name).with_suffix(".parquet"))
        b = pd.read_parquet((reference / name).with_suffix(".parquet"))
        pd.testing.assert_frame_equal(a, b)
    first = json.loads((curated["out"] / "report.json").read_text())
    second = json.loads((out / "report.json").read_text())
    assert first["reasons"] == second["reasons"] and first["stages"] == second["stages"]


@pytest.mark.slow
def test_slurm_array_tasks_on_disjoint_shards_then_merge_equal_one_run(curated, dedup_settings):
    """The SLURM templates themselves run (their #SBATCH lines are comments to bash), once per array task."""
    merge(curated, *dedup_settings)  # the reference: one run's output with these settings
    out = curated["root"] / "array"
    out.mkdir()
    for part in ("input", "download"):  # the download stage is the same as the reference run's
        shutil.copytree(curated["out"] / part, out / part)
    shutil.copy(curated["out"] / "prep_config.yaml", out / "prep_config.yaml")
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    shards = sorted(int(p.name.split("_")[0]) for p in (out / "download").glob("*_stats.json"))
    seen: list[int] = []
    for task in range(2):
        before = set((out / "scores").glob("*.parquet")) if (out / "scores").exists() else set()
        result = subprocess.run(["bash", str(REPO / "slurm/prep_embed.sbatch"), str(out), "--set", "embed.device=cpu"],
                                env={**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        mine = sorted(int(p.stem) for p in set((out / "scores").glob("*.parquet")) - before)
        assert mine == [s for s in shards if s % 2 == task]
        seen += mine
    assert sorted(seen) == shards
    result = subprocess.run(["bash", str(REPO / "slurm/prep_merge.sbatch"), str(out), *dedup_settings],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for tar in sorted((curated["out"] / "shards").glob("*.tar")):
        assert (out / "shards" / tar.name).read_bytes() == tar.read_bytes(), tar.name


def _same_output(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in (reference / "shards").glob("*.tar"))
    assert names and names == sorted(p.name for p in (out / "shards").glob("*.tar"))
    for name in names:
        assert (out / "shards" / name).read_bytes() == (reference / "shards" / name).read_bytes(), name
    first, second = (json.loads((d / "report.json").read_text()) for d in (reference, out))
    assert first["reasons"] == second["reasons"] and first["kept"] == second["kept"]


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_prep_with_a_requeued_embed_task_equals_a_local_run(curated, dedup_settings, slurm):
    """`addpipe slurm prep` on the two-node cluster: download -> embed array of 2 -> merge, with array task 1
    requeued (SIGTERM, then run again) after its first shard; the output equals the local `addpipe prep`'s."""
    merge(curated, *dedup_settings)  # the reference: the local run's output with these settings
    root, out = curated["root"], curated["root"] / "slurm-prep"
    env = {**clean_env(), "SLURM_CONF": str(slurm.conf)}
    result = subprocess.run(ADDPIPE + ["slurm", "prep", "--urls", str(root / "laion.parquet"), "--out", str(out),
                                       "--tasks", "2", "--cpus-per-task", "1", "--log-dir", str(root / "slurm-logs"),
                                       *curated["settings"], *dedup_settings, "--set", "embed.batch_size=2"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    download, embed, merged = (result.stdout.split("submitted download ")[1].replace(" -> embed array ", " ")
                               .replace(" -> merge ", " ").replace("(2 tasks)", "").split(";")[0].split())
    task = f"{embed}_1"
    deadline = time.monotonic() + 600
    while not (out / "scores" / "00001.parquet").exists():  # task 1's first shard (ids 1, 3, 5, ...)
        assert time.monotonic() < deadline and slurm.job_state(download) not in ("FAILED", "CANCELLED"), \
            "\n".join(p.read_text()[-3000:] for p in (root / "slurm-logs").glob("*.out"))
        time.sleep(0.05)
    state = slurm.job_state(task)
    slurm.run("scontrol", "requeue", task)
    assert state == "RUNNING", f"task 1 was {state} when requeued: it must be cut off mid-way"
    assert slurm.wait_job(merged, 900) == "COMPLETED", "\n".join(p.read_text()[-3000:] for p in (root / "slurm-logs").glob("*.out"))
    assert int(slurm.job_field(task, "Restarts") or 0) >= 1
    _same_output(out, curated["out"])
    logs = {p.name: p.read_text() for p in (root / "slurm-logs").glob("*.out")}
    assert logs and not [name for name, text in logs.items() if "\r" in text], "a progress bar reached a SLURM log"


@pytest.mark.cluster
@pytest.mark.slow
def test_spark_download_equals_the_multiprocessing_download_shard_for_shard(curated, spark):
    """download.distributor=pyspark against a standalone master with two workers."""
    out = curated["root"] / "spark"
    addpipe("prep", "download", "--urls", str(curated["root"] / "laion.parquet"), "--out", str(out), *curated["settings"],
            "--set", "download.distributor=pyspark", "--set", f"download.spark_master={spark.master}")
    reference = curated["out"] / "download"
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert names and names == sorted(p.name for p in (out / "download").glob("*.tar"))
    for name in names:
        # img2dataset writes samples in the order their downloads finish, with either distributor: compare contents
        with tarfile.open(reference / name) as a, tarfile.open(out / "download" / name) as b:
            assert sorted(a.getnames()) == sorted(b.getnames()), name
            for member in a.getmembers():
                assert a.extractfile(member).read() == b.extractfile(member.name).read(), (name, member.name)
        columns = ["key", "url", "caption", "status", "error_message", "width", "height", "sha256"]
        frames = [pd.read_parquet(path.with_suffix(".parquet"))[columns].sort_values("key").reset_index(drop=True)
                  for path in (reference / name, out / "download" / name)]
        pd.testing.assert_frame_equal(*frames)
    for stats in sorted(reference.glob("*_stats.json")):
        a, b = json.loads(stats.read_text()), json.loads((out / "download" / stats.name).read_text())
        assert {k: a[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")} == \
               {k: b[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")}, stats.name
    # Stage 1's table and its scheme refusals are addpipe's, around whichever distributor: the same rows either way
    pd.testing.assert_frame_equal(pd.read_parquet(curated["out"] / "input" / "urls.parquet"),
                                  pd.read_parquet(out / "input" / "urls.parquet"))


def test_near_duplicates_blockwise_and_faiss_agree_with_a_brute_force_greedy_reference():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 16))
    copies = base[rng.integers(0, 60, size=40)] + 0.05 * rng.normal(size=(40, 16))
    embeddings = np.concatenate([base, copies])[rng.permutation(100)]
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    threshold = 0.95
    kept: list[int] = []
    expected = np.zeros(100, dtype=bool)
    for i in range(100):
        if kept and max(float(embeddings[i] @ embeddings[j]) for j in kept) >= threshold:
            expected[i] = True
        else:
            kept.append(i)
    assert 10 < expected.sum() < 60
    for block_size in (7, 32, 1000):
        duplicate, nearest = near_duplicates(embeddings, threshold, block_size)
        np.testing.assert_array_equal(duplicate, expected)
        assert np.all(nearest[duplicate] >= threshold)
    pytest.importorskip("faiss")
    duplicate, _ = near_duplicates(embeddings, threshold, 16, backend="faiss")
    np.testing.assert_array_equal(duplicate, expected)


def test_input_formats_and_column_errors(tmp_path):
    from addpipe.dataprep.table import InputError, normalise, read_table

    frame = pd.DataFrame({"link": ["http://a/1.jpg", "http://a/2.jpg"], "text": ["één", None], "key": [1, 2], "extra": [0.5, 0.7]})
    frame.to_csv(tmp_path / "t.csv.gz", index=False)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv.gz", "t.jsonl", "t.parquet"):
        config = InputConfig(urls=str(tmp_path / name), url_column="link", caption_column="text")
        table, carried = normalise(read_table(config), config)
        assert list(table["caption"]) == ["één", ""] and list(table["row_id"]) == [0, 1]
        assert carried == ["row_id", "input_key", "extra"]  # 'key' would collide with img2dataset's own field
    with pytest.raises(InputError, match="no column 'url'.*its columns are: link, text, key, extra"):
        read_table(InputConfig(urls=str(tmp_path / "t.parquet")))
    with pytest.raises(InputError, match="does not exist"):
        read_table(InputConfig(urls=str(tmp_path / "nope.parquet")))


@pytest.mark.slow
def test_cli_errors_are_clear_and_leave_no_output(tmp_path, curated):
    result = run_cli("prep", "--urls", str(curated["root"] / "laion.parquet"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no column 'url'" in result.stderr and "URL, TEXT, name" in result.stderr
    # offline (the suite's HF_HUB_OFFLINE=1) with the default models, none cached: named before any download
    result = run_cli("prep", "--urls", str(curated["root"] / "laion.parquet"), "--out", str(tmp_path / "o4"),
                     "--set", "input.url_column=URL", "--set", "input.caption_column=TEXT")
    assert result.returncode == 2 and "models missing" in result.stderr and "embed.pretrained" in result.stderr, result.stderr
    assert "addpipe fetch" in result.stderr and not (tmp_path / "o4" / "download").exists()
    result = run_cli("prep", "--out", str(tmp_path / "o2"), "--set", "filter.min_clipsim=0.3")
    assert result.returncode == 2 and "unknown config key" in result.stderr and "min_clip_similarity" in result.stderr
    result = run_cli("prep", "merge", "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and "prep download" in result.stderr
    result = addpipe("prep", "--urls", str(curated["root"] / "laion.parquet"), "--out", str(tmp_path / "o3"),
                     *curated["settings"], "--set", "download.distributor=pyspark", check=False)  # Spark: its own process
    try:
        import pyspark  # noqa: F401
    except ImportError:  # pyspark is an extra: its absence must be explained, not a traceback
        assert result.returncode == 2 and "pip install pyspark" in result.stderr
    else:  # a local Spark session, its executors running this interpreter (which has img2dataset)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "o" / "download").exists()


def shard_samples(out: Path) -> list[tuple[str, bytes]]:
    """(caption, image bytes) of every sample of the output shards, in shard and member order."""
    found = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {}
            for member in tar:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        found += [(m["txt"].decode(), m["jpg"]) for _, m in sorted(members.items())]
    return found


@pytest.mark.slow
def test_images_on_disk_curate_as_the_same_images_served_over_http(curated, dedup_settings, tmp_path):
    """`prep --images DIR` equals `prep --urls` of the same files served on loopback, sample for sample: the same
    resizing, scores, filters, dedup, report and shards; a caption comes from the image's sidecar .txt; a link out of
    DIR is a failed row, never read."""
    china, flower = sample_photos()
    files = {  # name -> (bytes, caption or None for no sidecar); read in path order
        "a/china.jpg": (jpeg(china), "a photo of a temple roof"),
        "a/flower.png": (png(flower), "a flower in a garden"),
        "b/cmyk.jpg": (jpeg(china.transpose(Image.FLIP_LEFT_RIGHT), mode="CMYK"), "a temple printed in cmyk"),
        "b/digit.jpg": (jpeg(digit_photo(40, 200)), "a handwritten digit in colour"),
        "c/no-caption.jpg": (jpeg(digit_photo(41, 200)), None),
        "c/truncated.jpg": (jpeg(flower)[:6000], "half of a flower"),
        "d/china-copy.jpg": (jpeg(china), "the same temple again"),
    }
    images = tmp_path / "images"
    for name, (body, caption) in files.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(body)
        if caption is not None:
            (images / name).with_suffix(".txt").write_text(caption + "\n")
    (images / ".hidden").mkdir()
    (images / ".hidden" / "x.jpg").write_bytes(jpeg(flower))  # hidden: not an input
    (images / "z-outside.jpg").symlink_to(curated["root"] / "local.jpg")  # points out of DIR: refused, never read
    settings = [*curated["settings"][:-4], *dedup_settings]  # the base settings, with dedup

    local = addpipe("prep", "--images", str(images), "--out", str(tmp_path / "local"), *settings)
    assert "8 image(s) under" in local.stdout and "6 with a caption file" in local.stdout
    routes = {"/" + name: Route(body, "image/png" if name.endswith(".png") else "image/jpeg")
              for name, (body, _) in files.items()}
    with ImageServer(routes) as server:
        table = pd.DataFrame({"url": [server.url("/" + name) for name in files],
                              "caption": [caption or "" for _, caption in files.values()]})
        table.to_parquet(tmp_path / "urls.parquet")
        addpipe("prep", "--urls", str(tmp_path / "urls.parquet"), "--out", str(tmp_path / "web"), *settings)

    local_samples, web_samples = shard_samples(tmp_path / "local"), shard_samples(tmp_path / "web")
    assert [caption for caption, _ in local_samples] == ["a photo of a temple roof", "a flower in a garden",
                                                        "a temple printed in cmyk", "a handwritten digit in colour"]
    assert local_samples == web_samples
    reasons = pd.read_parquet(tmp_path / "local" / "shards" / "_decisions.parquet").set_index("path")["reason"]
    assert reasons["c/no-caption.jpg"] == "caption_empty" and reasons["d/china-copy.jpg"] == "exact_duplicate"
    assert reasons["c/truncated.jpg"].startswith("failed_to_resize")
    assert reasons["z-outside.jpg"] == "failed_to_download: file outside the allowed roots"
    web_report = json.loads((tmp_path / "web" / "report.json").read_text())
    local_report = json.loads((tmp_path / "local" / "report.json").read_text())
    assert local_report["kept"] == web_report["kept"] == 4
    outside = dict(local_report["reasons"])
    assert outside.pop("failed_to_download: file outside the allowed roots") == 1 and outside == web_report["reasons"]

    rerun = addpipe("prep", "--images", str(images), "--out", str(tmp_path / "local"), *settings)  # resumes: all done
    assert shard_samples(tmp_path / "local") == local_samples and "kept 4 of 8 rows" in rerun.stdout
    both = run_cli("prep", "--images", str(images), "--urls", "x.parquet", "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "give one" in both.stderr
    with pytest.raises(ValueError, match="allowed_file_roots"):
        from addpipe.dataprep.config import DownloadConfig

        DownloadConfig(allowed_schemes=["file"])
