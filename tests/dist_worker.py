"""Run under torchrun by test_distributed.py: train, check ZeRO-3 partitioning, round-trip a checkpoint."""

import hashlib
import json
import sys

import torch

from addpipe.config import load
from addpipe.train import distributed, engines
from addpipe.train.config import TrainConfig
from addpipe.train.loop import Trainer

ORIGINAL_LINEAR = torch.nn.functional.linear


def digest(module) -> str:
    with engines.full_parameters(module):
        joined = b"".join(p.detach().float().cpu().numpy().tobytes() for p in module.parameters())
    return hashlib.sha256(joined).hexdigest()


def main(config_path: str, report_path: str, *overrides: str) -> None:
    config = load(TrainConfig, config_path, list(overrides))
    trainer = Trainer(config)
    params = list(trainer.student.module.parameters())
    partitioned = all(engines.is_partitioned(p) for p in params)
    local = sum(p.ds_tensor.numel() for p in params) if partitioned else None
    full = sum(p.ds_numel for p in params) if partitioned else None
    trainer.run()
    trained = digest(trainer.student.module)
    resumed = Trainer(config, resume=True)  # loads the final checkpoint the run just wrote
    round_trip = digest(resumed.student.module) == trained
    if distributed.is_main():
        with open(report_path, "w") as handle:
            json.dump({"partitioned": partitioned, "local": local, "full": full, "round_trip": round_trip,
                       "world_size": distributed.world_size(), "step": resumed.step,
                       # ZeRO-3's process-wide F.linear replacement ignores autocast on CUDA (bf16 runs fail)
                       "linear_untouched": torch.nn.functional.linear is ORIGINAL_LINEAR}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
