"""The source corpora the frontend tests run over: LANGUAGE.md examples, stdlib, examples/."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANGUAGE_MD = REPO.parent / "shared" / "LANGUAGE.md"


def language_examples() -> list[tuple[str, str]]:
    """(cell name, source) of every fenced block of LANGUAGE.md that declares a cell,
    extracted as /work/shared/tools/conformance.py does. Empty if LANGUAGE.md is absent."""
    if not LANGUAGE_MD.exists():
        return []
    out = []
    for block in re.findall(r"```\n(.*?)```", LANGUAGE_MD.read_text(), flags=re.S):
        m = re.search(r"^cell\s+(\w+)", block, flags=re.M)
        if m:
            out.append((m.group(1), block))
    return out


def stdlib_sources() -> list[tuple[str, str]]:
    return [(str(p.relative_to(REPO)), p.read_text()) for p in sorted((REPO / "stdlib").rglob("*.rec"))]


def example_sources() -> list[tuple[str, str]]:
    return [(str(p.relative_to(REPO)), p.read_text()) for p in sorted((REPO / "examples").glob("*.rec"))]


def spec_or_stdlib() -> list[tuple[str, str]]:
    """The LANGUAGE.md examples, or the stdlib files where LANGUAGE.md is not beside the repo
    (a fallback, never an empty list)."""
    return language_examples() or stdlib_sources()


def all_valid_sources() -> list[tuple[str, str]]:
    return language_examples() + stdlib_sources() + example_sources()

