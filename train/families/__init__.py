"""Model families behind one interface (base.py): the UNet families (unet.py: SD 1.x/2.x, SDXL) and the flow-matching
transformer SD3/SD3.5 (sd3.py) built in, others as plug-ins.

A family registers itself with `register_family`, from its own module or from an installed package's
`addpipe.families` entry point; `model.architecture: <name>` chooses it, or `auto` finds it from the pipeline's
model_index.json (the most recently registered family that matches wins, so a plug-in can claim a more specific
kind of directory than a built-in one).
"""

from __future__ import annotations


from addpipe.plugins import load_entry_points
from addpipe.train.families.base import Denoiser, ModelFamily
from addpipe.train.families.sd3 import StableDiffusion3
from addpipe.train.families.unet import StableDiffusion, StableDiffusionXL


_FAMILIES: dict[str, ModelFamily] = {}
_discovered = False


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Make `family` available as `model.architecture: <family.name>` (usable as a class decorator)."""
    if not family.name:
        raise ValueError(f"{family.__qualname__} has no name: set the class attribute `name`")
    _FAMILIES.pop(family.name, None)  # re-registering moves it to the end: it is asked first again
    _FAMILIES[family.name] = family()
    return family


register_family(StableDiffusion)
register_family(StableDiffusionXL)
register_family(StableDiffusion3)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    load_entry_points("addpipe.families", ModelFamily, _FAMILIES, register_family, "model family")


def family(name: str) -> ModelFamily:
    _discover()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}: one of {', '.join(family_names())}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def family_of_index(index: dict, where: str) -> ModelFamily:
    """The family a pipeline's model_index.json belongs to."""
    _discover()
    for candidate in reversed(list(_FAMILIES.values())):
        if candidate.matches(index):
            return candidate
    components = ", ".join(sorted(k for k in index if not k.startswith("_"))) or "none"
    raise ValueError(f"{where}: no model family recognises this pipeline (components: {components}; class "
                     f"{index.get('_class_name', '?')}); known families: {', '.join(family_names())}")


__all__ = ["Denoiser", "ModelFamily", "family", "family_names", "family_of_index", "register_family"]
