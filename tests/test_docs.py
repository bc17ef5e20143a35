"""The docs point at things that exist: every repository path they name, every relative link and
its anchor. Moving a script or a results file without its references fails here."""
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")])
# A path the docs name: under one of the repository's folders, as written in prose or code.
PATH = re.compile(r"(?<![\w/.-])((?:bench|docs|models|service|worker|congeal|tests)/[\w./{},*-]*[\w/}*])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Names that stand for a family of files, or for what a command will write, not for one file.
PLACEHOLDER = re.compile(r"<|\*|/[A-Z]{3,}\b|NNNNN")


def _expand(path: str) -> list[str]:
    """``a_{1,2}.sh`` -> ``a_1.sh``, ``a_2.sh``."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _slug(heading: str) -> str:
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", md.read_text(), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_and_link_in_the_docs_exists(doc):
    text = doc.read_text()
    missing = []
    for m in PATH.finditer(text):
        raw = m.group(1).rstrip(".,")
        if PLACEHOLDER.search(raw):
            continue
        for p in _expand(raw):
            for one in p.split(","):  # `a/x,a/y`: a list written as one argument
                if one and not (ROOT / one).exists():
                    missing.append(one)
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {sorted(set(missing))}"
