"""Print constraints.txt: every package `congeal[test]` installs, at the version installed here.

    python .ci/constraints.py > constraints.txt

Run it in the environment CI tested (after `bash .ci/run`, with any upgrade you mean to take).
torch is written without its local version (+cpu): the CPU wheel here and PyPI's CUDA wheel in the
worker image both satisfy `torch==X`.
"""
from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(roots: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        r = todo.pop()
        key = (canonicalize_name(r.name), tuple(sorted(r.extras)))
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(r.name)
        pins[key[0]] = dist.version.split("+", 1)[0]
        for dep in map(Requirement, dist.requires or []):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *r.extras)):
                todo.append(dep)
    return pins


def main() -> int:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pins = closure(project["dependencies"] + project["optional-dependencies"]["test"])
    print("# Every package `pip install -e .[test]` brings, pinned: used by .ci/run and the Dockerfile.")
    print("# Regenerate with `python .ci/constraints.py > constraints.txt` (see that script).")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
