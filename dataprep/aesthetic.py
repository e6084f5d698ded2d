"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

A linear stack on the L2-normalised CLIP image embedding (ViT-L/14 for the published weights), with the
published module names (`layers.0 ... layers.7`) so its `.pth` state dicts load unchanged. The published
model has dropout between the linear layers and no activations; in eval mode it is an affine map, kept in
this form so the weights' names and shapes are the published ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class AestheticPredictor(nn.Module):
    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic(source: str, device: torch.device | str = "cpu") -> AestheticPredictor:
    """Weights from a local file or an http(s) URL (cached by torch.hub); the input size is read from them."""
    if source.startswith(("http://", "https://")):
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False)
        except Exception as error:
            raise FileNotFoundError(
                f"could not fetch the aesthetic predictor from {source} ({error}); download it elsewhere and set "
                "filter.aesthetic_weights to the local file, or filter.aesthetic_weights=null to skip the score"
            ) from error
    else:
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise FileNotFoundError(f"aesthetic predictor weights {path} do not exist (filter.aesthetic_weights)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if "layers.0.weight" not in state:
        raise ValueError(f"{source} is not an aesthetic-predictor state dict (no layers.0.weight; keys: {sorted(state)[:6]})")
    model = AestheticPredictor(state["layers.0.weight"].shape[1])
    model.load_state_dict(state)
    return model.eval().to(device)
