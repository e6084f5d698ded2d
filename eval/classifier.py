"""A content classifier trained on the real data: FID's feature space and the prompt-adherence judge.

FID with Inception features means little on 32-pixel digits, and the discriminator's own DINOv2 cannot be
the yardstick (the student was trained to fool it). So the evaluation trains a *separate* network of a
different family, a small convolutional net, on the real images with one head per label field (digit,
ink colour, background colour). Its penultimate features are the space for the Fréchet distance
(`--features classifier:DIR`), and its predictions check whether an image shows what its prompt asked
for: the requested classes are read from the prompt with the regular expression stored beside the
weights (named groups = fields).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from addpipe.backbone import fit_classifier, image_tensor, labelled_images, normalise

CONFIG_NAME = "addpipe_classifier.json"
WEIGHTS_NAME = "classifier.pt"


class ContentClassifier(nn.Module):
    """Conv-BN-ReLU stages (32 -> 16 -> 8 pixels), then a feature layer over the flattened 8x8 map, then heads.

    No global pooling: where the strokes are is what tells a handwritten 6 from a 9."""

    def __init__(self, classes: dict[str, list[str]], width: int = 16, feature_dim: int = 64, image_size: int = 32,
                 prompt_pattern: Optional[str] = None):
        super().__init__()
        self.classes = {field: list(names) for field, names in classes.items()}
        # prompt word (lower case) -> stored class, per field: requested() matches prompts case-insensitively
        self.by_word = {field: {str(name).lower(): name for name in names} for field, names in self.classes.items()}
        for field, names in self.classes.items():
            if len(self.by_word[field]) < len(names):
                clashes = sorted(str(n) for n in names if [str(m).lower() for m in names].count(str(n).lower()) > 1)
                raise ValueError(f"classes of {field!r} differ only in case ({', '.join(clashes)}); prompts are "
                                 "matched case-insensitively, so rename them")
        self.image_size = image_size
        self.prompt_pattern = prompt_pattern
        self.settings = {"width": width, "feature_dim": feature_dim}

        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*stage(3, width, 2), *stage(width, 2 * width, 1), *stage(2 * width, 2 * width, 2),
                                  nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(2 * width * 64, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({field: nn.Linear(feature_dim, len(names)) for field, names in classes.items()})

    def features(self, normalised: torch.Tensor) -> torch.Tensor:
        return self.body(normalised)

    def forward(self, normalised: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.features(normalised)
        return {field: head(embedding) for field, head in self.heads.items()}

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Normalised images on the device the classifier lives on."""
        device = next(self.parameters()).device
        return normalise(torch.stack([image_tensor(image, self.image_size) for image in images]).to(device))

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> dict[str, list[str]]:
        logits = self(self.pixels(images))
        return {field: [self.classes[field][i] for i in value.argmax(1).tolist()] for field, value in logits.items()}

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        return {field: value.softmax(1) for field, value in self(self.pixels(images)).items()}

    def requested(self, prompt: str) -> dict[str, str]:
        """The classes `prompt` asks for, by the stored pattern; fields it does not name (or unknown names) are left out."""
        if not self.prompt_pattern:
            return {}
        match = re.search(self.prompt_pattern, prompt, flags=re.IGNORECASE)
        if not match:
            return {}
        # "Red" in a prompt names a stored "red", and "seven" a stored "Seven"
        return {field: self.by_word[field][value.lower()] for field, value in match.groupdict().items()
                if field in self.by_word and value and value.lower() in self.by_word[field]}

    def save(self, directory: Path, **info) -> Path:
        """Weights plus the config `load_classifier` needs; `info` (training provenance) is stored beside it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps({
            "classes": self.classes, "image_size": self.image_size, "prompt_pattern": self.prompt_pattern, **self.settings,
            **info}, indent=2))
        return directory


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> ContentClassifier:
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a content classifier (no {CONFIG_NAME}); train one with the demo "
                                "or eval.classifier.train_classifier")
    config = json.loads(config_path.read_text())
    model = ContentClassifier(config["classes"], config["width"], config["feature_dim"], config["image_size"],
                              config.get("prompt_pattern"))
    model.load_state_dict(torch.load(directory / WEIGHTS_NAME, map_location="cpu", weights_only=True))
    return model.eval().to(device)


def train_classifier(shards: str, out_dir: Path, fields: list[str], prompt_pattern: Optional[str] = None,
                     image_size: int = 32, steps: int = 800, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> Path:
    """Train on `shards`' images and json `fields`; save weights, classes, held-out accuracy and the prompt pattern."""
    data = labelled_images(shards, fields, image_size)
    torch.manual_seed(seed)
    model = ContentClassifier(data.classes, image_size=image_size, prompt_pattern=prompt_pattern).train()
    heads, accuracy = fit_classifier(model.features, list(model.body.parameters()), model.settings["feature_dim"], data,
                                     steps, lr=lr, seed=seed + 1, desc="content classifier", progress=progress)
    model.heads = heads
    return model.eval().save(out_dir, trained_on=shards, images=len(data), steps=steps, holdout_accuracy=accuracy)


def adherence(classifier: ContentClassifier, images: list[Image.Image], prompts: list[str], batch_size: int = 256) -> dict[str, float]:
    """Share of images whose predicted class is the requested one, per field and for all fields at once."""
    hits: dict[str, list[bool]] = {field: [] for field in classifier.classes}
    every: list[bool] = []
    for start in range(0, len(images), batch_size):
        predicted = classifier.predict(images[start:start + batch_size])
        for offset, prompt in enumerate(prompts[start:start + batch_size]):
            wanted = classifier.requested(prompt)
            if not wanted:
                continue
            results = [predicted[field][offset] == value for field, value in wanted.items()]
            for (field, _), ok in zip(wanted.items(), results):
                hits[field].append(ok)
            every.append(all(results))
    out = {field: float(np.mean(values)) for field, values in hits.items() if values}
    if every:
        out["all"] = float(np.mean(every))
        out["counted"] = len(every)
    return out
