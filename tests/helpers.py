"""Shared test helpers (tests/ is on sys.path through the top-level conftest)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE_MD = ROOT.parent / "shared" / "LANGUAGE.md"


def language_examples() -> dict[str, str]:
    """name -> source of every cell example of LANGUAGE.md (the stdlib copies when the
    shared folder is absent, so the tests still run on a lone clone)."""
    if LANGUAGE_MD.exists():
        out = {}
        for block in re.findall(r"```\n(.*?)```", LANGUAGE_MD.read_text(), flags=re.S):
            m = re.search(r"^cell\s+(\w+)", block, flags=re.M)
            if m:
                out[m.group(1)] = block
        return out
    from recdsl.spec import stdlib_files
    out = {}
    for p in stdlib_files().values():
        m = re.search(r"^cell\s+(\w+)", p.read_text(), flags=re.M)
        out[m.group(1)] = p.read_text()
    return out
