"""Checks that the running environment holds exactly the packages of a lock file, at its versions.

    python scripts/check_lock.py constraints/main.txt

Every package the lock names must be installed at the locked version, and nothing else may be
installed but the project itself and the installers (pip, setuptools, wheel). Exits 1 with one
line per difference, 0 when the environment equals the lock.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ALWAYS_ALLOWED = {"at2po", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: {line!r} is not a 'name==version' pin; regenerate with bash scripts/lock.sh")
        pins[canonical(name.split("[")[0])] = version.split(";")[0].strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name, version in sorted(lock.items()):
        if name not in have:
            out.append(f"missing: {name}=={version}")
        elif have[name] != version:
            out.append(f"version: {name} is {have[name]}, the lock says {version}")
    for name in sorted(set(have) - set(lock) - ALWAYS_ALLOWED):
        out.append(f"not in the lock: {name}=={have[name]}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/check_lock.py LOCKFILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"{path}: no such lock file (constraints/*.txt)", file=sys.stderr)
        return 2
    lock = read_lock(path)
    problems = differences(lock, installed())
    for line in problems:
        print(f"{path}: {line}")
    if not problems:
        print(f"{path}: the environment equals the lock ({len(lock)} packages)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
