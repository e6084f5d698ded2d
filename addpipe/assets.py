"""The downloadable assets a config names, and fetching them once for nodes without a network (`addpipe fetch`).

A config field that names something to download says so in its metadata (`field(..., metadata=ASSET_PIPELINE)`):
a diffusers pipeline on the Hugging Face hub (the teacher: only the folders addpipe loads, in the asked variant), a
hub model repository (a VAE, DINOv2, a CLIP text model), open_clip pretrained weights (a model name and its tag), or
a file at a URL (the aesthetic predictor, cached where torch.hub caches). Each stage's config tree marks its own
fields; this module walks any tree, so a new stage or method with a marked field is covered without an edit here.
Local paths are not assets: they are checked where they are used.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from addpipe.errors import UserError

ASSET_PIPELINE = {"asset": "pipeline"}
"""A diffusers pipeline: hub id or local directory (siblings `revision` and `variant` apply)."""
ASSET_MODEL = {"asset": "model"}
"""A hub model repository (transformers or diffusers model), or a local directory."""
ASSET_OPEN_CLIP = {"asset": "open_clip"}
"""open_clip pretrained weights: this field is the tag (openai, laion2b_..., hf-hub:org/name), the sibling `model`
the architecture; a local file is not an asset."""
ASSET_URL = {"asset": "url"}
"""A file at an http(s) URL, cached by torch.hub; a local path is not an asset."""

PIPELINE_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2",
                    "text_encoder_3", "unet", "transformer", "vae")
"""The pipeline folders addpipe loads; the rest of a repository (single-file checkpoints at its root, safety
checker, ONNX/Flax exports) is not downloaded."""
LOADED_WEIGHTS = ("model.", "model-", "diffusion_pytorch_model", "pytorch_model")
SKIPPED_SUFFIXES = (".ckpt", ".msgpack", ".onnx", ".onnx_data", ".pb", ".h5", ".ot", ".mlmodel", ".tflite")


class AssetError(UserError, RuntimeError):
    """An asset that is not in the cache (offline) or cannot be fetched."""


@dataclass(frozen=True)
class Asset:
    kind: str
    """pipeline, model, open_clip or url."""
    name: str
    """Hub id, open_clip `model@tag`, or URL."""
    field: str
    """The config key that names it, e.g. model.teacher."""
    revision: Optional[str] = None
    variant: Optional[str] = None

    def __str__(self) -> str:
        extra = "".join(f" ({label} {value})" for label, value in (("revision", self.revision),
                                                                    ("variant", self.variant)) if value)
        return f"{self.field}: {self.name}{extra}"


def looks_local(name: str) -> bool:
    """A path rather than a hub id: it exists, is spelled like a path, or is not `owner/name` (hub ids have exactly
    one slash, e.g. `demo_out/models/teacher` cannot be one), or its first part is a local directory (`runs/x`)."""
    if name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name)):
        return True
    return name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/")[0]))


def assets(config: Any, prefix: str = "") -> Iterator[Asset]:
    """Every downloadable asset the config tree names, once each, in the tree's order."""
    seen: set[tuple[str, str]] = set()
    for asset in _walk(config, prefix):
        if (asset.kind, asset.name) not in seen:
            seen.add((asset.kind, asset.name))
            yield asset


def marked_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, str, str, Any]]:
    """(dotted key, value, asset kind, the section holding it) of every non-empty field marked as an asset."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from marked_fields(value, key + ".")
        elif item.metadata.get("asset") and isinstance(value, str) and value:
            yield key, value, item.metadata["asset"], config


def _walk(config: Any, prefix: str) -> Iterator[Asset]:
    for key, value, kind, config in marked_fields(config, prefix):
        if kind == "open_clip":
            if not looks_local(value):
                yield Asset(kind, f"{getattr(config, 'model')}@{value}", key)
        elif kind == "url":
            if value.startswith(("http://", "https://")):
                yield Asset(kind, value, key)
        elif not looks_local(value):
            yield Asset(kind, value, key, getattr(config, "revision", None) if kind == "pipeline" else None,
                        getattr(config, "variant", None) if kind == "pipeline" else None)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def choose_files(files: list[str], kind: str, variant: Optional[str]) -> list[str]:
    """The files of a repository addpipe loads: configs, tokenizers, and per folder one set of weights (safetensors
    in the asked variant, else plain safetensors, else PyTorch .bin), nothing else."""
    if kind == "pipeline":
        files = [f for f in files if f == "model_index.json" or f.split("/")[0] in PIPELINE_FOLDERS]
    files = [f for f in files if not f.endswith(SKIPPED_SUFFIXES) and not f.startswith(".")]
    by_folder: dict[str, list[str]] = {}
    for name in files:
        by_folder.setdefault(os.path.dirname(name), []).append(name)
    chosen = []
    for folder, names in by_folder.items():
        weights = [n for n in names if n.endswith((".safetensors", ".bin")) or ".safetensors.index" in n
                   or ".bin.index" in n]
        rest = [n for n in names if n not in weights]
        # what transformers' and diffusers' from_pretrained read (not open_clip's or other libraries' copies)
        weights = [n for n in weights if os.path.basename(n).startswith(LOADED_WEIGHTS)]
        if kind == "pipeline" and folder == "":
            weights = []  # a single-file checkpoint beside model_index.json: not what from_pretrained reads
        chosen += rest + _one_weight_set(weights, variant)
    return sorted(chosen)


def weight_variant(name: str) -> Optional[str]:
    """The variant a weight file is saved in (model.fp16.safetensors, model.fp16-00001-of-00002.safetensors,
    diffusion_pytorch_model.safetensors.index.fp16.json: fp16), or None for the plain weights."""
    base = os.path.basename(name)
    for pattern in (r"\.(?:safetensors|bin)\.index\.([\w-]+)\.json$", r"^[^.]+\.([\w]+)-\d+-of-\d+\.(?:safetensors|bin)$",
                    r"^[^.-]+\.([\w]+)\.(?:safetensors|bin)$"):
        match = re.search(pattern, base)
        if match:
            return match.group(1)
    return None


def _one_weight_set(weights: list[str], variant: Optional[str]) -> list[str]:
    """safetensors before .bin; the asked variant, else (as from_pretrained does) the plain weights."""
    for wanted in ([variant, None] if variant else [None]):
        for suffix in (".safetensors", ".bin"):
            found = [w for w in weights if suffix in w and weight_variant(w) == wanted]
            if found:
                return found
    return []


def _hub_files(asset: Asset, cache_dir: Optional[str]) -> tuple[Path, list[str]]:
    """(the local snapshot directory, its files), downloading what is missing unless offline."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if offline():
        try:
            path = snapshot_download(asset.name, revision=asset.revision, cache_dir=cache_dir, local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError) as error:
            raise AssetError(f"{asset} is not in the cache ({cache_dir or 'the default HF cache'})") from error
        return Path(path), sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())
    try:
        info = HfApi().model_info(asset.name, revision=asset.revision)
        files = choose_files([s.rfilename for s in info.siblings or []], asset.kind, asset.variant)
        path = snapshot_download(asset.name, revision=asset.revision, cache_dir=cache_dir, allow_patterns=files)
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise AssetError(f"{asset}: {str(error).strip().splitlines()[0]}") from error
    return Path(path), files


def _open_clip(asset: Asset, cache_dir: Optional[str]) -> Path:
    import open_clip

    model, tag = asset.name.split("@", 1)
    if tag.startswith("hf-hub:"):
        return _hub_files(Asset("model", tag[len("hf-hub:"):], asset.field), cache_dir)[0]
    config = open_clip.get_pretrained_cfg(model, tag)
    if not config:
        raise AssetError(f"{asset}: open_clip has no pretrained weights {tag!r} for {model}")
    hub = config.get("hf_hub", "").strip("/")
    if hub:  # org/repo[/folder]: what open_clip itself downloads
        from huggingface_hub import hf_hub_download

        parts = hub.split("/")
        repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
        filename = config.get("hf_hub_filename") or "open_clip_pytorch_model.bin"
        try:
            return Path(hf_hub_download(repo, f"{folder}/{filename}" if folder else filename, cache_dir=cache_dir,
                                        local_files_only=offline()))
        except Exception as error:  # noqa: BLE001 - offline misses, network and auth errors all mean the same here
            raise AssetError(f"{asset}: {'not in the cache' if offline() else str(error).splitlines()[0]}") from error
    if offline():
        raise AssetError(f"{asset}: its weights come from a URL ({config.get('url')}); fetch it while online")
    return Path(open_clip.download_pretrained(config, cache_dir=cache_dir))


def _url(asset: Asset) -> Path:
    import torch.hub
    from urllib.parse import urlparse

    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(asset.name).path)
    if target.is_file():
        return target
    if offline():
        raise AssetError(f"{asset}: not in torch.hub's cache ({target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(asset.name, str(target), progress=True)
    except OSError as error:
        raise AssetError(f"{asset}: {error}") from error
    return target


def fetch(asset: Asset, cache_dir: Optional[str] = None) -> Path:
    """Where the asset lies once fetched (downloaded now unless already cached; offline: from the cache or an
    AssetError)."""
    if asset.kind in ("pipeline", "model"):
        return _hub_files(asset, cache_dir)[0]
    if asset.kind == "open_clip":
        return _open_clip(asset, cache_dir)
    return _url(asset)


def fetch_all(found: list[Asset], cache_dir: Optional[str] = None) -> tuple[dict[Asset, Path], list[str]]:
    """Every asset fetched, or the one-line reason it could not be: ({asset: path}, [problems])."""
    paths, problems = {}, []
    for asset in found:
        try:
            paths[asset] = fetch(asset, cache_dir)
        except AssetError as error:
            problems.append(str(error))
    return paths, problems


def missing_offline(config: Any, kinds: Optional[tuple[str, ...]] = None) -> list[str]:
    """Offline (HF_HUB_OFFLINE=1), the hub models and weight URLs `config` names that are not in the cache, one line
    each, found from the cache alone (no retries of an unreachable hub); online, nothing."""
    if not offline():
        return []
    found = [a for a in assets(config) if kinds is None or a.kind in kinds]
    _, missing = fetch_all(found)
    return [f"{line} (HF_HUB_OFFLINE=1: run `addpipe fetch` where there is a network)" for line in missing]
