"""Import direction between the stages, read from the source with `ast` (nothing is imported).

- the shared core (`addpipe/`) imports no stage;
- no stage imports the CLI and demo (`addpipe.pipeline`); only pipeline/ may import every stage;
- evaluation imports neither training internals (`addpipe.train.<module>`; the public names that
  train/__init__.py lists in `__all__` are allowed: `from addpipe.train import sample_timesteps`) nor curation;
- curation imports neither training nor evaluation;
- no module imports a private name (leading underscore) from another root folder.

Every `import x` and `from x import y` counts, relative ones and those inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"addpipe": "addpipe", "dataprep": "addpipe.dataprep", "train": "addpipe.train", "eval": "addpipe.eval",
            "slurm": "addpipe.slurm", "pipeline": "addpipe.pipeline"}
"""Root folder -> the package pyproject.toml maps it to."""
STAGES = ("dataprep", "train", "eval", "slurm", "pipeline")


class Import(NamedTuple):
    line: int
    target: str
    """The imported dotted name: `from a.b import c` -> a.b.c (a module or a name in a.b)."""
    module: str
    """The module imported from (a.b above; the target itself for `import a.b`)."""
    name: Optional[str]
    """The name taken from `module` (c above; None for `import a.b`)."""
    text: str


def module_name(folder: str, relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[folder], *parts])


def imports(source: str, module: str, is_package: bool = False) -> Iterator[Import]:
    """Every import statement in `source` (module `module`), anywhere in it, as absolute dotted names."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        text = ast.get_source_segment(source, node) if isinstance(node, (ast.Import, ast.ImportFrom)) else None
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node.lineno, alias.name, alias.name, None, text or f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            for alias in node.names:
                yield Import(node.lineno, f"{source_module}.{alias.name}", source_module, alias.name, text or "")


def stage_of(dotted: str) -> Optional[str]:
    """'core' for addpipe's own modules, the root folder for a stage, None outside addpipe."""
    parts = dotted.split(".")
    if parts[0] != "addpipe":
        return None
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "core"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def train_public_names(init_source: str) -> set[str]:
    """The names train/__init__.py lists in `__all__`."""
    for node in ast.parse(init_source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def violations(folder: str, where: str, found: Import, train_public: set[str]) -> list[str]:
    """What is wrong with one import of a module in root folder `folder`; `where` names the file."""
    problems = []
    stage = stage_of(found.target)
    if stage is None:
        return problems
    said = f"{where}:{found.line}: `{found.text}`"
    if folder == "addpipe" and stage != "core":
        problems.append(f"{said}: the shared core imports the {stage} stage")
    if folder != "pipeline" and stage == "pipeline":
        problems.append(f"{said}: only pipeline/ may import addpipe.pipeline")
    if folder == "eval":
        if stage == "dataprep":
            problems.append(f"{said}: evaluation imports curation (move what it needs into the shared core)")
        elif stage == "train" and found.target != "addpipe.train":
            public = found.module == "addpipe.train" and found.name in train_public
            if not public:
                problems.append(f"{said}: evaluation imports a training internal (use the shared core or a name in "
                                f"addpipe.train's __all__: {sorted(train_public)})")
    if folder == "dataprep" and stage in ("train", "eval"):
        problems.append(f"{said}: curation imports the {stage} stage")
    source_folder = "addpipe" if stage == "core" else stage
    if source_folder != folder and any(is_private(part) for part in found.target.split(".")[1:]):
        problems.append(f"{said}: imports a private name from another folder ({source_folder}/)")
    return problems


def check_tree(root: Path = ROOT) -> list[str]:
    train_public = train_public_names((root / "train" / "__init__.py").read_text())
    problems = []
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root / folder)
            source = path.read_text()
            module = module_name(folder, relative)
            for found in sorted(imports(source, module, is_package=path.name == "__init__.py")):
                problems += violations(folder, str(path.relative_to(root)), found, train_public)
    return list(dict.fromkeys(problems))  # `from a import b, c`: one line per statement and rule


def check_sample(folder: str, source: str, file: str = "sample.py") -> list[str]:
    train_public = train_public_names((ROOT / "train" / "__init__.py").read_text())
    module = module_name(folder, Path(file))
    return list(dict.fromkeys(p for found in sorted(imports(source, module, is_package=file == "__init__.py"))
                              for p in violations(folder, f"{folder}/{file}", found, train_public)))


def test_the_repository_keeps_its_import_direction():
    problems = check_tree()
    assert not problems, "\n".join(problems)


def test_the_train_stage_has_a_public_surface_for_evaluation():
    names = train_public_names((ROOT / "train" / "__init__.py").read_text())
    assert {"ModelLoadError", "sample_timesteps", "load_student", "generate"} <= names
    import addpipe.train

    for name in names:  # every listed name resolves (lazily)
        assert getattr(addpipe.train, name) is not None, name


def test_the_checker_finds_each_kind_of_bad_import():
    """The checker itself: each rule on a small sample (so that an empty result above means something)."""
    bad = {
        ("eval", "from addpipe.train.backbone import fit_classifier\n"): "training internal",
        ("eval", "def f():\n    from addpipe.train.models import ModelLoadError\n"): "training internal",
        ("eval", "import addpipe.train.sampling\n"): "training internal",
        ("eval", "from addpipe.train import sampling\n"): "training internal",
        ("eval", "from addpipe.dataprep.clip import load_clip\n"): "imports curation",
        ("eval", "def f():\n    from addpipe.dataprep.embed import read_images\n"): "imports curation",
        ("eval", "import addpipe.dataprep\n"): "imports curation",
        ("eval", "from ..train.schedule import student_timesteps\n"): "training internal",
        ("train", "from addpipe.pipeline.demo import DemoSettings\n"): "only pipeline/",
        ("slurm", "import addpipe.pipeline.cli\n"): "only pipeline/",
        ("addpipe", "from addpipe.train import distributed\n"): "shared core imports the train stage",
        ("addpipe", "from . import eval\n"): "shared core imports the eval stage",
        ("addpipe", "from .dataprep.config import EmbedConfig\n"): "shared core imports the dataprep stage",
        ("dataprep", "from addpipe.train.models import load_teacher\n"): "curation imports the train stage",
        ("dataprep", "from addpipe.eval import metrics\n"): "curation imports the eval stage",
        ("pipeline", "from addpipe.eval.report import _plt\n"): "private name",
        ("train", "from addpipe.devices import _cuda_index\n"): "private name",
        ("slurm", "import os\n\nfrom addpipe.train.encode import _shard_rows\n"): "private name",
    }
    for (folder, source), expected in bad.items():
        problems = check_sample(folder, source)
        assert any(expected in p for p in problems), (folder, source, problems)
        line = source.rstrip("\n").count("\n") + 1  # each sample's bad import is its last line
        assert all(p.startswith(f"{folder}/sample.py:{line}: `") for p in problems), (line, problems)
    assert check_sample("eval", "import os\n\n\ndef f():\n    from addpipe.dataprep import embed\n") == [
        "eval/sample.py:5: `from addpipe.dataprep import embed`: evaluation imports curation (move what it needs into "
        "the shared core)"]
    fine = [
        ("eval", "from addpipe.train import ModelLoadError, sample_timesteps\nimport addpipe.train\n"),
        ("eval", "from addpipe.backbone import fit_classifier\nfrom addpipe.clip import load_clip\nfrom . import db\n"),
        ("eval", "from addpipe.plots import pyplot\nfrom addpipe.shards import read_images\n"),
        ("pipeline", "from addpipe.train.sampling import generate\nfrom addpipe.eval.generate import Arm\n"),
        ("pipeline", "from addpipe import __version__\n"),
        ("train", "from addpipe.train import distributed\nfrom addpipe.train.models import _encode_prompts\n"),
        ("addpipe", "from addpipe.devices import resolve_device\nfrom . import shards\nimport numpy\n"),
        ("dataprep", "from addpipe.clip import load_clip\nfrom .config import PrepConfig\n"),
    ]
    for folder, source in fine:
        assert check_sample(folder, source) == [], (folder, source)


def test_every_package_in_the_tree_is_in_the_wheel():
    """pyproject's explicit package list names every folder with an __init__.py, or a non-editable install (a wheel
    on a cluster) would lack it while the editable one here still imports it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"addpipe" if name == "addpipe" else f"addpipe.{name}": path
               for name, path in [("addpipe", "addpipe")] + [(k.split(".", 1)[1], v) for k, v in config["package-dir"].items() if k != "addpipe"]}
    found = set()
    for package, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(config["packages"]), f"missing from pyproject: {sorted(found - set(config['packages']))}"
