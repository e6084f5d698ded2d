"""How much does each candidate discriminator text condition say about the prompt? A linear probe per field.

    .venv/bin/python benchmarks/text_condition_probe.py [--teacher pipeline/assets/digits_teacher] [--prompts 1000]

The ADD discriminator is projection-conditioned on a text embedding (`discriminator.text_embedding`): the pooled one
(CLIP's EOS token) or the mean of the hidden states the UNet cross-attends to. A condition from which a linear map
cannot read the digit leaves the discriminator blind to the digit. This encodes the demo's captions (dataprep.digits,
a seed the training data does not use) with the teacher's text encoder, fits a logistic regression per field (digit,
ink, background) on half of them and reports its accuracy on the other half, for each condition.
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from addpipe.dataprep.digits import digit_images  # noqa: E402
from addpipe.pipeline.demo import SHIPPED_TEACHER, labels  # noqa: E402
from addpipe.train.config import ModelConfig  # noqa: E402
from addpipe.train.models import encode_prompts, load_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    teacher = load_teacher(ModelConfig(teacher=args.teacher), with_unet=False)
    captions, fields = [], []
    for caption, _, meta in digit_images(args.prompts, size=8, seed=args.seed):
        captions.append(caption)
        fields.append(labels(meta))
    with torch.no_grad():
        conditioning = encode_prompts(teacher, captions, "cpu")
    train = np.arange(len(captions)) % 2 == 0
    print(f"{len(captions)} captions, half for fitting, half held out; teacher {args.teacher}; "
          f"{platform.machine()}, {os.cpu_count()} cores\n")
    print("| text condition | width | " + " | ".join(f"{f} accuracy" for f in fields[0]) + " |")
    print("|---|---:|" + "---:|" * len(fields[0]))
    for kind in ("pooled", "mean"):
        x = conditioning.discriminator_embedding(kind).float().numpy()
        scores = []
        for field in fields[0]:
            y = np.array([f[field] for f in fields])
            probe = LogisticRegression(max_iter=5000).fit(x[train], y[train])
            scores.append(probe.score(x[~train], y[~train]))
        print(f"| {kind} | {x.shape[1]} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
