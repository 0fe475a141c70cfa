"""Every ```rec example of docs/LANGUAGE.md parses, checks, plans and runs (reference and
torch agree), and the error the reference shows for the AL-RNN example without its `where`
clause is the one the checker prints."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import recdsl

DOC = Path(__file__).resolve().parents[2] / "docs" / "LANGUAGE.md"
TEXT = DOC.read_text(encoding="utf-8")
EXAMPLES = {re.search(r"^cell\s+(\w+)", b, flags=re.M).group(1): b
            for b in re.findall(r"```rec\n(.*?)```", TEXT, flags=re.S)}


def test_the_reference_has_examples():
    assert {"ALRNN", "LSSLBilinear", "LSSLZOH"} <= set(EXAMPLES)
    # every fenced block that declares a cell is a ```rec one (a ```text block is a template)
    for block in re.findall(r"```\n(.*?)```", TEXT, flags=re.S):
        assert not re.search(r"^cell\s", block, flags=re.M), block


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_doc_example_checks_and_runs(name):
    torch = pytest.importorskip("torch")
    spec = recdsl.load(EXAMPLES[name])
    dims = spec.analysis_dims()
    spec.plan()
    torch.manual_seed(0)
    ref = spec(backend="reference", **dims).double()
    other = spec(backend="torch", **dims).double()
    other.load_state_dict(ref.state_dict())
    xs = {n: torch.randn(2, 4, *ref.ir.shape_of(node), dtype=torch.float64) for n, node in ref.ir.inputs.items()}
    (o1, s1), (o2, s2) = ref(**xs), other(**xs)
    assert torch.allclose(o1, o2, atol=1e-10)
    assert all(torch.allclose(s1[k], s2[k], atol=1e-10) for k in s1)


def test_documented_error_is_the_real_one():
    m = re.search(r"^\s*(alrnn\.rec:(\d+):(\d+): error: .*)\n\s*(hint: .*)$", TEXT, flags=re.M)
    assert m, "the AL-RNN error example"
    src = EXAMPLES["ALRNN"].replace(" where 0 <= P <= M", "")
    with pytest.raises(recdsl.RecError) as info:
        recdsl.load(src).name
    lines = str(info.value).replace("<string>", "alrnn.rec").splitlines()
    assert lines[0] == m.group(1)
    assert lines[-1] == m.group(4)
