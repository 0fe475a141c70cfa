"""The generator makes well-typed cells that land in every class of LANGUAGE.md §4; its
frontend mutants are accepted or rejected with a RecError."""
import random

from recdsl import RecError, parse_and_check
from recdsl.analysis import analyze
from recdsl.fuzz.generator import generate, mutate
from recdsl.parser import parse
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
    seen, lowerings, details = set(), set(), set()
    for _, spec in generated:
        plan = analyze(spec.lower(**spec.analysis_dims()), verify=False)
        for s in plan.stages:
            seen.add(s.cls)
            lowerings.add((s.cls, s.lowering))
            details.add((s.cls, s.detail.split(",")[0]))
        assert len(plan.stages) <= 4
    # every class of §4 but the DAG one (no backend runs grids/DAGs on sequences' terms yet)
    assert seen >= set(CLASSES) - {DAG_LINEAR}, set(CLASSES) - seen
    assert ("diagonal affine", "chunkwise (matrix state from outer products)") in lowerings
    assert ("identity + low rank", "chunkwise delta rule (WY/UT form)") in lowerings
    for d in [("semiring affine", "max-plus"), ("semiring affine", "log-sum-exp"),
              ("diagonal affine", "scalar decay"), ("diagonal affine", "vector decay"),
              ("diagonal affine", "elementwise decay"), ("diagonal affine", "identity decay"),
              ("identity + low rank", "rank 1"), ("identity + low rank", "rank 2"),
              ("block-diagonal affine", "2x2 blocks"),
              ("nonlinear", "dense Jacobian"), ("nonlinear", "diagonal Jacobian")]:
        assert d in details, d


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
