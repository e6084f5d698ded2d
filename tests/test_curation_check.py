"""The demo's curation yardsticks: dedup precision and recall against planted copies, the CLIP score's separation
of matching from shuffled captions, and the tiny CLIP training that makes both mean something."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from addpipe.pipeline.curation_check import caption_separation, dedup_accuracy


def decisions(reasons: dict[int, str]) -> pd.DataFrame:
    return pd.DataFrame({"url": [f"http://127.0.0.1:1/digits/{row:06d}.{'jpg' if row % 2 else 'png'}" for row in reasons],
                         "reason": list(reasons.values())})


def test_dedup_precision_and_recall_count_copies_of_kept_images_only():
    reasons = {0: "kept", 1: "kept", 2: "near_duplicate", 3: "near_duplicate", 4: "kept", 5: "near_duplicate",
               6: "below_clip_top_fraction", 7: "kept", 8: "exact_duplicate", 9: "near_duplicate"}
    planted = {"reencoding": {2: 0, 4: 1, 7: 6, 9: 3}, "exact_copy": {8: 1}}
    # re-encodings: 2 (of kept 0) dropped, 4 (of kept 1) missed, 7 copies a CLIP-dropped image (not eligible), 9 copies
    # 3, itself dropped (not eligible, yet a planted row among the drops); drops 2, 3, 5, 9 -> 2 planted of 4
    result = dedup_accuracy(decisions(reasons), planted)
    assert result["reencoding"] == {"planted": 4, "eligible": 2, "drops": 4, "found": 2, "precision": 0.5, "recall": 0.5}
    assert result["exact_copy"] == {"planted": 1, "eligible": 1, "drops": 1, "found": 1, "precision": 1.0, "recall": 1.0}
    nothing = dedup_accuracy(decisions({0: "kept", 1: "kept"}), {"reencoding": {}})
    assert nothing["reencoding"]["precision"] is None and nothing["reencoding"]["recall"] is None


def test_caption_separation_is_one_for_a_perfect_score_and_a_half_for_noise():
    rng = np.random.default_rng(0)
    count = 400
    captions = pd.DataFrame({"caption": [f"caption {i % 50}" for i in range(count)]})
    texts = np.eye(50)[np.arange(count) % 50]
    perfect = caption_separation(captions, texts.copy(), texts)
    assert perfect["auc"] == 1.0 and perfect["matching_mean"] == 1.0 and perfect["shuffled_mean"] == 0.0
    noise = rng.normal(size=(count, 50))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    assert abs(caption_separation(captions, noise, texts)["auc"] - 0.5) < 0.08
    with pytest.raises(ValueError, match="at least two"):
        caption_separation(captions[:1], texts[:1], texts[:1])


def test_train_clip_learns_the_captions_and_overwrites_its_checkpoint(tmp_path, caplog):
    import open_clip

    from addpipe.dataprep.digits import digit_images
    from addpipe.dataprep.tiny import build_tiny_clip, train_clip

    data = list(digit_images(96, size=32, seed=3))
    images, captions = [image for _, image, _ in data], [caption for caption, _, _ in data]
    settings = build_tiny_clip(tmp_path / "clip", embed_dim=32, image_size=32)
    before = {k: v.clone() for k, v in torch.load(settings["pretrained"]).items()}
    with caplog.at_level(logging.INFO):
        result = train_clip(settings, images, captions, steps=40, batch_size=48, progress=False)
    assert result["last_loss"] < 0.7 * result["first_loss"]
    assert [r.getMessage() for r in caplog.records if r.name == "root"] == []  # open_clip's steps: not in the demo's log
    model, _, preprocess = open_clip.create_model_and_transforms(settings["model"], pretrained=settings["pretrained"])
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tokens = open_clip.get_tokenizer(settings["model"])(captions)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True).numpy()
        text_features = model.encode_text(tokens, normalize=True).numpy()
    assert caption_separation(pd.DataFrame({"caption": captions}), image_features, text_features)["auc"] > 0.8
    with pytest.raises(ValueError, match="equal count"):
        train_clip(settings, images[:3], captions[:2], steps=1)
