"""What a run's numbers depend on besides its settings: the machine and the installed packages.

Two runs with the same spec and seed give the same numbers only on the same CPU kernels, thread
count and package versions. On CPU, torch picks its kernels by the instruction set it finds
(AVX2, AVX512, ...), and a different kernel changes the last bits of a logit; one flipped
sample in the first rollout step and the two runs diverge from there. The ablation sweep met
this: the same job, from the same cached warm start, gave held-out EM 0.515 on one machine and
0.485 on another with the same torch and transformers versions. A paired difference between
runs made in different environments therefore mixes the row's effect with the environment's.

``environment()`` records, per run, what can differ; its ``fingerprint`` hashes the parts that
change a run's numbers (CPU model and instruction set, torch's kernel choice and threads,
Python, and the versions of every package the trainer imports, directly or not). The statistics
(``at2po.evidence.stats``) compare two runs only when their fingerprints agree.

The package's own source is hashed too (``at2po_source``) but kept out of the fingerprint: code
changes are deliberate and tracked by git, and most of them (docs, tests, this runner's
reporting) change no number; the tables list the source hashes a sweep's runs were made with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["FINGERPRINT_FIELDS", "environment", "fingerprint", "requirement_closure"]

# The fields of environment() whose change can change a run's numbers.
FINGERPRINT_FIELDS = (
    "python", "machine", "cpu_model", "cpu_isa", "torch_cpu_capability", "torch_threads", "cuda", "packages",
)
# Instruction-set flags that decide which kernels the math libraries run (x86 and ARM names).
_ISA_FLAG = re.compile(r"(avx\w*|amx\w*|fma\w*|f16c|sse4\w*|asimd\w*|sve\w*|sme\d*)")


def fingerprint(env: dict[str, Any]) -> str:
    """A short hash of the FINGERPRINT_FIELDS of an environment() record."""
    missing = [f for f in FINGERPRINT_FIELDS if f not in env]
    if missing:
        raise ValueError(f"an environment record needs {missing} to be fingerprinted")
    payload = json.dumps({f: env[f] for f in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _cpu() -> tuple[str, list[str]]:
    """(model name, sorted instruction-set flags) from /proc/cpuinfo; the platform's names elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = re.search(r"^(?:model name|Model|cpu model)\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    isa = sorted({f for f in (flags.group(1).split() if flags else []) if _ISA_FLAG.fullmatch(f)})
    return (model.group(1).strip() if model else platform.machine()), isa


def requirement_closure(root: str = "at2po", extras: tuple[str, ...] = ("train",)) -> dict[str, str]:
    """{distribution name: version} of ``root`` with ``extras`` and everything it requires,
    directly or not, as installed (requirements not installed, or excluded by their markers, are
    left out). Tools installed beside it (pytest, linters) are not part of it."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                todo.append((req.name, frozenset(req.extras)))
    return dict(sorted(found.items()))


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """sha256 of the at2po package's Python source, read once per process (so a file edited while
    a sweep runs does not change what a running worker reports about the code it loaded)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment() -> dict[str, Any]:
    """This process's environment record, with its ``fingerprint``."""
    import torch

    cpu_model, isa = _cpu()
    env: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpu_model": cpu_model, "cpu_isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
        "packages": requirement_closure(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "at2po_source": _source_hash(),
    }
    env["fingerprint"] = fingerprint(env)
    return env
