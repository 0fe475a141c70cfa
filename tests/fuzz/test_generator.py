"""The generator makes well-typed cells that land in every class of LANGUAGE.md §4; its
frontend mutants are accepted or rejected with a RecError."""
import random
from collections import Counter

import recdsl
from recdsl import RecError, parse_and_check
from recdsl.analysis import analyze
from recdsl.fuzz.generator import TAGS, generate, mutate
from recdsl.parser import parse
from recdsl.pipeline import plan_cell
from recdsl.plan import CLASSES, DAG_LINEAR
from recdsl.printer import to_source

N_CELLS = 400  # as conftest.py


def test_generated_cells_check_and_print_back(generated):
    assert len(generated) == N_CELLS
    for src, spec in generated:  # recdsl.load succeeded in the fixture: parsed and checked
        tree = parse(src)
        assert parse(to_source(tree)) == tree
        assert spec.cell.states and spec.cell.inputs and spec.cell.outputs, src


def test_generator_is_deterministic_and_varied():
    assert generate(random.Random(7)) == generate(random.Random(7))
    assert len({generate(random.Random(i)) for i in range(100)}) == 100


def test_class_coverage(generated):
    seen, details = set(), set()
    for _, spec in generated:
        plan = analyze(spec.lower(**spec.analysis_dims()), verify=False)
        for s in plan.stages:
            seen.add(s.cls)
            details.add((s.cls, s.detail.split(",")[0]))
            details.update((s.cls, part.strip()) for part in s.detail.split(",")[1:])
        assert len(plan.stages) <= 4
    # every class of §4 but the DAG one (no backend runs grids/DAGs on sequences' terms yet)
    assert seen >= set(CLASSES) - {DAG_LINEAR}, set(CLASSES) - seen
    for d in [("semiring affine", "max-plus"), ("semiring affine", "log-sum-exp"),
              ("diagonal affine", "scalar decay"), ("diagonal affine", "vector decay"),
              ("diagonal affine", "elementwise decay"), ("diagonal affine", "identity decay"),
              ("diagonal affine", "log space"),
              ("identity + low rank", "rank 1"), ("identity + low rank", "rank 2"), ("identity + low rank", "rank 3"),
              ("identity + low rank", "ungated"), ("identity + low rank", "gated (scalar decay)"),
              ("identity + low rank", "diagonal decay (on keys)"),
              ("block-diagonal affine", "2x2 blocks"), ("dense affine", ""),
              ("nonlinear", "dense Jacobian"), ("nonlinear", "diagonal Jacobian")]:
        assert d in details or (d[1] == "" and any(c == d[0] for c, _ in details)), d


def test_lowering_coverage(generated):
    """The torch backend's fast forms are reached (chunkwise matrix states, the chunkwise
    delta rule, Householder products, diagonal-plus-low-rank for KDA/RWKV-7-like updates) and
    so are their fallbacks (the element scan for a matrix state, the loop for a delta rule)."""
    forms, candidates = set(), set()
    for _, spec in generated:
        plan = plan_cell(spec.lower(**spec.analysis_dims()), verify=False)
        forms.update((s.cls, type(c.form).__name__) for s, c in zip(plan.stages, plan.selections["torch"].stages))
        candidates.update(type(c).__name__ for cands in plan.candidates for c in cands)
    want = {("diagonal affine", "ChunkDiag"), ("diagonal affine", "ElementScan"),
            ("identity + low rank", "ChunkDelta"), ("identity + low rank", "HouseholderProducts"),
            ("identity + low rank", "ChunkDPLR"),
            ("identity + low rank", "SequentialLoop"), ("semiring affine", "ElementScan"),
            ("block-diagonal affine", "BlockScan"), ("dense affine", "SequentialLoop"),
            ("nonlinear", "SequentialLoop"), ("hoisted", "Vectorised")}
    assert want <= forms, want - forms
    assert "ChunkDPLR" in candidates


def test_every_spelling_tag_is_drawn(tagged):
    """Within N_CELLS seeded draws every spelling of TAGS is generated at least once (and
    only registered tags are reported); generate() is generate_tagged()'s source."""
    seen = Counter(t for _, tags in tagged for t in tags)
    assert set(seen) <= set(TAGS), set(seen) - set(TAGS)
    missing = [t for t in TAGS if not seen[t]]
    assert not missing, missing
    for i in (0, 1, 17):
        assert generate(random.Random(i)) == tagged[i][0]
    assert all(tags == sorted(set(tags)) for _, tags in tagged)


def _cell_line(src):
    return src.splitlines()[0]


# what a tag promises about the source text (a regex that must match somewhere)
SPELLING_TEXT = {
    "mat.decay.hyper": r"gamma\d+ \* S\d+|S\d+ \* gamma\d+|= gamma\d+\n",
    "vec.decay.const": r"(0\.9|0\.5|0\.95) \* h[ab]?\d+|h\d+ \* (0\.9|0\.5|0\.95)",
    "mat.decay.param": r"param p\d+\[\] = 0\.(9|5)",
    "mat.decay.param_vec": r"param p\d+\[(K|V)\] = 0\.9",
    "mat.shape.key": r"\[:, None\] \* S\d+|S\d+ \* .*\[:, None\]",
    "mat.shape.value": r"\[None, :\] \* S\d+|S\d+ \* .*\[None, :\]",
    "mat.decay.sigmoid_pow": r"sigmoid\(.*\) \*\* ",
    "mat.decay.signed": r"tanh\(|cos\(|-0\.5 \* sigmoid",
    "readout.sum": r"sum\(S\d+'? \* .*\[:, None\], axis=0\)",
    "readout.prev": r"@ S\d+(?![\d'])",
    "seq.scalar_input": r"input .*\b\w+\[\]",
    "step.concat": r"concat\(",
    "step.split_state": r"= split\(h\d+, 2\)",
    "householder.loop": r"for j in range\(NH\d*\):",
    "householder.n3": r"NH\d*=3|(l2norm[\s\S]*){3}",
    "delta.rwkv7": r"- outer\(a\d+ \* kn\d+, kn\d+ @ S\d+\)",
    "delta.kda": r"Sd\d+ = .* \* S\d+\n",
    "delta.combined": r"outer\(.*, .* - kn\d+ @ S\d+\)",
}


def test_tags_match_the_source(tagged):
    import re
    checked = Counter()
    for src, tags in tagged:
        for t in tags:
            if t in SPELLING_TEXT:
                assert re.search(SPELLING_TEXT[t], src), (t, src)
                checked[t] += 1
        if any(t.endswith(".decay.hyper") for t in tags) or any("(1/tau" in ln for ln in src.splitlines()):
            assert re.search(r"(gamma|tau)\d+=", _cell_line(src)), src
    assert set(checked) == set(SPELLING_TEXT)


def test_decays_are_tame(tagged):
    """Every decay spelling keeps |decay| <= 1 and keys of delta rules normalised: the
    reference on a few cells of each delta / matrix spelling stays bounded over 200 steps."""
    import torch

    from recdsl.fuzz.runner import Case, _Run, build, random_dims
    picked = {}
    for src, tags in tagged:
        for t in tags:
            if t.startswith(("mat.decay.", "delta.decay.", "householder.", "delta.")) and t not in picked:
                picked[t] = src
    assert len(picked) > 30
    for t, src in sorted(picked.items()):
        spec = recdsl.load(src)
        case = Case(src, random_dims(spec, random.Random(0)), B=1, T=200, grad=False)
        torch.manual_seed(0)
        layer = build(spec, "reference", case)
        gen = torch.Generator().manual_seed(0)
        xs = {n: torch.randn((1, 200) + layer.ir.concrete(v.shape), generator=gen, dtype=torch.float64) * 0.5
              for n, v in spec.cell.inputs.items()}
        run = _Run(layer, xs, None, case, [], gen)
        big = max(float(x.abs().max()) for x in list(run.outs) + list(run.states.values()))
        assert big < 1e3, (t, big, src)


def test_multi_stage_cells_with_hoisting_and_readouts(generated):
    multi = hoisted = readouts = 0
    for _, spec in generated:
        plan = analyze(spec.lower(**spec.analysis_dims()), verify=False)
        multi += len(plan.stages) > 1
        hoisted += bool(plan.hoisted)
        readouts += any(o.kind == "linear readout" for o in plan.outputs)
    assert multi > N_CELLS // 4 and hoisted > N_CELLS // 2 and readouts > N_CELLS // 3


def test_frontend_mutants_accept_or_raise_recerror(generated):
    rng = random.Random(0)
    rejected = 0
    for src, _ in generated[:150]:
        for _ in range(4):
            m = mutate(src, rng)
            try:
                parse_and_check(m, "mutant.rec")
            except RecError as e:
                assert "error:" in str(e)
                rejected += 1
    assert rejected > 300
