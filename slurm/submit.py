"""`addpipe slurm train|prep|pairs`: render this folder's batch scripts for an allocation and submit them with sbatch.

The scripts here run as they are (`sbatch slurm/train.sbatch ...`, their #SBATCH lines are defaults); rendering
replaces those lines with the allocation asked for, bakes in the Python that rendered them (the cluster's nodes
share the file system, so the same virtual environment runs there) and the working directory, and keeps the
rendered script beside its logs as `<script>-<job id>.sbatch`, so that what ran can be read afterwards.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from addpipe.errors import UserError

TEMPLATES = Path(__file__).resolve().parent
# SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmError(UserError, RuntimeError):
    """A submission that cannot be made as asked (printed without a traceback)."""


def seconds(limit: str) -> int:
    """A SLURM time limit in seconds."""
    found = TIME.match(limit.strip())
    if not found:
        raise SlurmError(f"--time {limit!r} is not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS, ...)")
    days, first, second, third = found.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        total = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # HH:MM:SS
        total = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        total = int(first) * 60 + int(second)
    else:  # MM
        total = int(first) * 60
    if total <= 0:
        raise SlurmError(f"--time {limit!r} must be longer than zero")
    return total


def signal_lead(limit_seconds: int, asked: Optional[int]) -> int:
    """Seconds before the time limit at which SIGUSR1 asks for a checkpoint: 10 minutes, or a quarter of a short
    job (at least 60 s: SLURM checks the limits about once a minute)."""
    if asked is not None:
        if not 0 < asked < limit_seconds:
            raise SlurmError(f"--signal-before {asked} s must be between 0 and the time limit ({limit_seconds} s)")
        return asked
    return min(600, max(60, limit_seconds // 4))


@dataclass
class Allocation:
    """What to ask SLURM for; None leaves the template's default."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    job_name: Optional[str] = None
    signal_before: Optional[int] = None
    log_dir: Path = Path("logs")
    extra: list[str] = field(default_factory=list)
    """Further sbatch options, verbatim (e.g. --qos=high, --constraint=a100)."""

    def check(self) -> None:
        if self.nodes < 1:
            raise SlurmError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SlurmError(f"--gpus-per-node must be 0 (a CPU partition) or more, got {self.gpus_per_node}")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SlurmError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.time is not None:
            seconds(self.time)


@dataclass
class Partition:
    """What `sinfo` says about the partition a job goes to."""

    name: str
    cpus: list[int]
    """CPUs of each node."""
    gpus: list[int]
    """GPUs (gres gpu) of each node."""


def parse_sinfo(text: str, partition: Optional[str]) -> Optional[Partition]:
    """`sinfo -h -N -o '%N|%P|%c|%G'` -> the asked partition (else the default one, marked `*`), or None."""
    rows = [line.split("|") for line in text.splitlines() if line.count("|") == 3]
    wanted = partition or next((p.rstrip("*") for _, p, _, _ in rows if p.endswith("*")), None)
    nodes: dict[str, tuple[int, int]] = {}
    for node, name, cpus, gres in rows:
        if name.rstrip("*") != wanted or not cpus.strip().isdigit():
            continue
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))
        nodes[node] = (int(cpus), gpus)
    if wanted is None or not nodes:
        return None
    return Partition(wanted, [c for c, _ in nodes.values()], [g for _, g in nodes.values()])


def query_partition(partition: Optional[str]) -> Optional[Partition]:
    """The partition as `sinfo` sees it, or None where sinfo is not reachable (off the cluster, a dry run)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        found = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return None
    found_partition = parse_sinfo(found.stdout, partition)
    if found_partition is None and partition is not None and found.stdout.strip():
        names = sorted({line.split("|")[1].rstrip("*") for line in found.stdout.splitlines() if line.count("|") == 3})
        raise SlurmError(f"partition {partition!r} not found; sinfo lists {', '.join(names)}")
    return found_partition


def fit_cpus(what: str, asked: Optional[int], default: Optional[int], tasks_per_node: int, allocation: "Allocation",
             partition: Optional[Partition], notes: list[str]) -> Optional[int]:
    """CPUs per task for one job: what was asked (refused where no node of the partition has that many), else the
    template's default cut down to the nodes that can run the job (a request no node can meet pends forever with
    reason PartitionConfig), else the node's share per task. None: leave it to the template."""
    if partition is None:
        return asked if asked is not None else default
    eligible = [c for c, g in zip(partition.cpus, partition.gpus) if g >= allocation.gpus_per_node]
    if len(eligible) < allocation.nodes:
        gpus = f" with {allocation.gpus_per_node} GPU(s)" if allocation.gpus_per_node else ""
        raise SlurmError(f"{what}: partition {partition.name} has {len(eligible)} node(s){gpus}, the job asks for "
                         f"{allocation.nodes}: it would pend forever")
    # the job's nodes can be any `nodes` of the eligible ones: what every such choice can give
    largest = sorted(eligible, reverse=True)[allocation.nodes - 1] // tasks_per_node
    if asked is not None:
        if asked > largest:
            raise SlurmError(f"{what}: {tasks_per_node} task(s) of {asked} CPUs per node do not fit partition "
                             f"{partition.name}, whose nodes have at most {largest * tasks_per_node} CPUs: it would pend "
                             f"forever (PartitionConfig). Ask for --cpus-per-task {max(1, largest)} or less")
        return asked
    if default is None:  # the node's share per task
        share = max(1, min(eligible) // tasks_per_node)
        notes.append(f"{what}: {share} CPU(s) per task, the node's share ({min(eligible)} CPUs, {tasks_per_node} "
                     f"task(s) per node, partition {partition.name})")
        return share
    if default > largest:
        fitted = max(1, largest)
        notes.append(f"{what}: the script asks for {default} CPUs per task; the nodes of partition {partition.name} have "
                     f"at most {largest * tasks_per_node}: asking for {fitted}")
        return fitted
    return default


def template_cpus(name: str) -> Optional[int]:
    found = re.search(r"^#SBATCH\s+--cpus-per-task=(\d+)", (TEMPLATES / name).read_text(), re.M)
    return int(found.group(1)) if found else None


def directives(template: str, allocation: Allocation, array: Optional[str] = None, gpus: bool = True,
               requeue_signal: bool = False) -> list[str]:
    """The #SBATCH lines: the template's, with the allocation's values in place of its defaults."""
    found = {}
    for line in template.splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(.*))?$", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    found["nodes"] = str(allocation.nodes)
    found["output"] = str(allocation.log_dir.resolve() / Path(found.get("output") or "%x-%j.out").name)
    if gpus and allocation.gpus_per_node:
        found["gpus-per-node"] = str(allocation.gpus_per_node)
        if "ntasks-per-node" in found:  # one task per GPU
            found["ntasks-per-node"] = str(allocation.gpus_per_node)
    elif allocation.tasks_per_node and "ntasks-per-node" in found:
        found["ntasks-per-node"] = str(allocation.tasks_per_node)
    for key, value in (("cpus-per-task", allocation.cpus_per_task), ("time", allocation.time),
                       ("partition", allocation.partition), ("account", allocation.account),
                       ("job-name", allocation.job_name), ("array", array)):
        if value is not None:
            found[key] = str(value)
    if requeue_signal:
        limit = seconds(found.get("time") or "48:00:00")
        found["signal"] = f"B:USR1@{signal_lead(limit, allocation.signal_before)}"
    lines = [f"#SBATCH --{key}" + ("" if value is None else f"={value}") for key, value in found.items()]
    return lines + [f"#SBATCH {option}" for option in allocation.extra]


def render(name: str, allocation: Allocation, array: Optional[str] = None, gpus: bool = True,
           requeue_signal: bool = False) -> str:
    """Template `name` with the allocation's #SBATCH lines, this Python and this working directory."""
    template = (TEMPLATES / name).read_text()
    head, body = [], []
    for line in template.splitlines():
        (body if body or not (line.startswith("#") or not line.strip()) else head).append(line)
    comments = [line for line in head if not line.startswith("#SBATCH")]
    rendered = comments[:1] + [f"# rendered by `addpipe slurm` from slurm/{name} on {dt.datetime.now().isoformat(timespec='seconds')}"]
    rendered += comments[1:] + directives(template, allocation, array, gpus, requeue_signal)
    rendered += [f"#SBATCH --chdir={Path.cwd()}", f"export ADDPIPE_PYTHON=${{ADDPIPE_PYTHON:-{shlex.quote(sys.executable)}}}"]
    return "\n".join(rendered + body) + "\n"


def sbatch(script: str, name: str, args: list[str], allocation: Allocation, dependency: Optional[str] = None,
           dry_run: bool = False) -> str:
    """Write the rendered script beside the logs and submit it; the job id (or the command, on a dry run)."""
    # afterok: a stage starts only after the one before succeeded; kill-on-invalid-dep: when that one failed or was
    # cancelled, SLURM cancels this job too instead of leaving it pending forever (DependencyNeverSatisfied)
    command = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
                                          if dependency else [])
    stem = Path(name).stem
    if dry_run:  # nothing is written: the script is the one printed above, saved under any name
        return shlex.join(command + [f"{stem}.sbatch", *args])
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: submit from a SLURM login node (or pass --dry-run to see the script)")
    allocation.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens the output file before the script runs
    # sbatch keeps its own copy of the script: once submitted, the file is named after the job, beside its log
    path = allocation.log_dir / f".{stem}-{os.getpid()}-{dt.datetime.now():%Y%m%d%H%M%S%f}.sbatch"
    path.write_text(script)
    found = subprocess.run(command + [str(path), *args], capture_output=True, text=True)
    if found.returncode != 0:
        path.unlink()
        raise SlurmError(f"sbatch refused {name}: {found.stderr.strip() or found.stdout.strip()}")
    job = found.stdout.strip().split(";")[0]
    path.replace(allocation.log_dir / f"{stem}-{job}.sbatch")
    return job


def submit_train(config: Path, overrides: list[str], allocation: Allocation, dry_run: bool = False,
                 notes: Optional[list[str]] = None) -> tuple[str, str]:
    """-> (the rendered script, the job id or, on a dry run, the sbatch command). The arguments must have been
    checked the way `addpipe train` checks them (the command line does). `notes`: what was adapted, to print."""
    allocation.check()
    if not Path(config).is_file():
        raise SlurmError(f"config not found: {config}")
    tasks = allocation.gpus_per_node or allocation.tasks_per_node or 1
    cpus = fit_cpus("train", allocation.cpus_per_task, None, tasks, allocation, query_partition(allocation.partition),
                    notes if notes is not None else [])
    script = render("train.sbatch", dataclasses.replace(allocation, cpus_per_task=cpus), requeue_signal=True)
    return script, sbatch(script, "train.sbatch", [str(Path(config).resolve()), *overrides], allocation, dry_run=dry_run)


def submit_pairs(config: Path, prompts: str, out: Path, tasks: int, overrides: list[str], allocation: Allocation,
                 dry_run: bool = False) -> tuple[str, str]:
    """`addpipe pairs` as an array of `tasks` one-node jobs. -> (the rendered script, the job id or sbatch command)."""
    allocation.check()
    allocation = dataclasses.replace(allocation, nodes=1)
    if not Path(config).is_file():
        raise SlurmError(f"config not found: {config}")
    if not Path(prompts).is_file():
        raise SlurmError(f"prompt table not found: {prompts}")
    if tasks < 1:
        raise SlurmError(f"--tasks must be at least 1, got {tasks}")
    cpus = fit_cpus("pairs", allocation.cpus_per_task, template_cpus("pairs.sbatch"), 1, allocation,
                    query_partition(allocation.partition), [])
    script = render("pairs.sbatch", dataclasses.replace(allocation, cpus_per_task=cpus), array=f"0-{tasks - 1}")
    args = [str(Path(config).resolve()), str(Path(prompts).resolve()), str(Path(out).resolve()), *overrides]
    return script, sbatch(script, "pairs.sbatch", args, allocation, dry_run=dry_run)


def submit_prep(urls: str, out: Path, tasks: int, options: list[str], allocation: Allocation,
                dry_run: bool = False, notes: Optional[list[str]] = None) -> tuple[list[str], list[str]]:
    """download -> embed array of `tasks` -> merge, each after the one before succeeded (and cancelled by SLURM
    when that one failed). -> (the three rendered scripts, their job ids or sbatch commands). `notes`: what was
    adapted to the partition, to print."""
    allocation.check()
    allocation = dataclasses.replace(allocation, nodes=1)  # each stage's job (and array task) is one node
    if "://" not in urls:  # a local table (or directory of tables) must exist before three jobs wait on it
        if not Path(urls).exists():
            raise SlurmError(f"URL table not found: {urls}")
        urls = str(Path(urls).resolve())
    if tasks < 1:
        raise SlurmError(f"--tasks must be at least 1, got {tasks}")
    out = Path(out).resolve()
    partition = query_partition(allocation.partition)
    notes = notes if notes is not None else []

    def fitted(name: str, gpus: bool) -> Allocation:
        stage = allocation if gpus else dataclasses.replace(allocation, gpus_per_node=0)
        cpus = fit_cpus(f"prep {name.split('_')[1].split('.')[0]}", allocation.cpus_per_task, template_cpus(name), 1,
                        stage, partition, notes)
        return dataclasses.replace(stage, cpus_per_task=cpus)

    download = render("prep_download.sbatch", fitted("prep_download.sbatch", False), gpus=False)
    embed = render("prep_embed.sbatch", fitted("prep_embed.sbatch", True), array=f"0-{tasks - 1}")
    merge = render("prep_merge.sbatch", fitted("prep_merge.sbatch", False), gpus=False)
    ids = [sbatch(download, "prep_download.sbatch", [urls, str(out), *options], allocation, dry_run=dry_run)]
    ids.append(sbatch(embed, "prep_embed.sbatch", [str(out), *options], allocation,
                      "DOWNLOAD_JOB" if dry_run else ids[0], dry_run))
    ids.append(sbatch(merge, "prep_merge.sbatch", [str(out), *options], allocation, "EMBED_JOB" if dry_run else ids[1],
                      dry_run))
    return [download, embed, merge], ids
