"""addpipe.train: the training stage (`addpipe train`, `addpipe pairs`).

Its public surface is what the other stages and users of an exported student need; evaluation imports these
names and no module of this package (tests/test_imports.py):

- `load_student(directory, device)`: an exported student (diffusers format plus addpipe_student.json) ->
  (components, noise schedule, metadata); `ModelLoadError` when a model cannot be loaded;
- `sample_timesteps(info, steps)`: the timesteps a student samples `steps` steps on (a subset of those it was
  trained on); `student_timesteps(steps, num_train_timesteps)`: evenly spaced trailing timesteps;
- `generate(unet, components, schedule, prompts, timesteps, seed, resolution, device)`: images in [0, 1] from the
  few-step sampler; `save_grid(images, path, rows)`.

The names resolve on first use (PEP 562): importing this package, or a light module of it such as
`addpipe.train.config`, imports neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ModelLoadError", "generate", "load_student", "sample_timesteps", "save_grid", "student_timesteps"]

_HOMES = {
    "ModelLoadError": "addpipe.train.models",
    "generate": "addpipe.train.sampling",
    "load_student": "addpipe.train.sampling",
    "sample_timesteps": "addpipe.train.sampling",
    "save_grid": "addpipe.train.sampling",
    "student_timesteps": "addpipe.train.schedule",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:  # AttributeError, so that `from addpipe.train import <submodule>` still imports the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
