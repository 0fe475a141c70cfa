"""The Jacobian structure the plan claims for each nonlinear stage holds numerically: the
step's Jacobian in its own states (float64, autograd at two random points) is zero wherever
the claim says it is (diagonal, block-diagonal over k states, block-diagonal by the
columns or rows of a matrix state), and a stage called dense has nonzeros where none of
those structures allows them -- so the analysis neither claims structure that is not there
nor misses the structure it knows how to find. Every sequence cell of the stdlib, of
benchmarks/cells and of tests/analysis/cells."""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl import plan as P
from recdsl.analysis.symbolic import random_leaves
from recdsl.spec import stdlib_files
from recdsl.torch_expr import compile_nodes

from helpers import ROOT

# matrix-state steps local along rows only, along neither, and along columns through a transpose;
# a vector step whose only mixing is a where's condition and a sign (piecewise constant)
INLINE = {
    "rows": """
cell RowLocal(K, V):
    input x[K, V]
    param W[V, V] ~ normal(0, 0.5)
    state M[K, V] = 0
    M' = tanh(M @ W + x)
    output M'
""",
    "dense": """
cell Dense(K, V):
    input k[K]
    param W[V, V] ~ normal(0, 0.5)
    state M[K, V] = 0
    M' = tanh(M + outer(k, softmax(k @ M) @ W))
    output M'
""",
    "columns by transposes": """
cell ColumnLocal(K, V):
    input k[K], x[V, K]
    state M[K, V] = 0
    M' = M - outer(k, relu(k @ M)) + tanh(x).T * M
    output M'
""",
    "where": """
cell Branchy(H):
    input x[H]
    state h[H] = 0
    h' = where(sum(h) <= 0, 0.5 * h, tanh(h)) - 0.1 * sign(sum(h)) + x
    output h'
""",
}
FILES = [*stdlib_files(), *map(str, sorted((ROOT / "benchmarks" / "cells").glob("*.rec"))),
         *map(str, sorted((ROOT / "tests" / "analysis" / "cells").glob("*.rec"))), *INLINE.values()]


def _nonlinear_stages():
    out = []
    for f in FILES:
        spec = recdsl.load(f)
        if spec.cell.over != "seq":
            continue
        plan = spec(backend="reference", **spec.analysis_dims()).compiled.plan
        name = next((k for k, v in INLINE.items() if v == f), f.rsplit("/", 1)[-1])
        out += [pytest.param(f, s.index, id=f"{name}:{s.index}")
                for s in plan.stages if s.cls == P.NONLINEAR]
    return out


def _jacobians(ir, states, seed):
    """{(out state, in state): J [*out shape, *in shape]} of one step, batch of one."""
    leaves = list(ir.inputs.values()) + list(ir.params.values()) + ir.state_leaves()
    step = compile_nodes([ir.updates[s] for s in states], leaves)
    values = random_leaves(leaves, ir.shape_of, batch=1, seed=seed)
    at = [next(i for i, n in enumerate(leaves) if n is ir.states[s]) for s in states]
    shapes = [tuple(ir.shape_of(ir.states[s])) for s in states]

    def f(*xs):
        vals = list(values)
        for i, x in zip(at, xs):
            vals[i] = x
        return tuple(y.expand((1,) + sh) for y, sh in zip(step(vals, 1, torch.float64, "cpu"), shapes))

    J = torch.autograd.functional.jacobian(f, tuple(values[i] for i in at))
    return {(o, i): J[a][b].reshape(shapes[a] + shapes[b]) for a, o in enumerate(states)
            for b, i in enumerate(states)}


def _allowed(kind: str, out_shape, in_shape) -> torch.Tensor:
    """Where a Jacobian block of this structure may be nonzero."""
    if kind == "elementwise":
        eye = torch.eye(int(torch.tensor(out_shape).prod()), dtype=torch.bool)
        return eye.reshape(out_shape + in_shape)
    (K, V), axis = out_shape, 1 if kind == "column" else 0
    i = torch.arange(V if axis == 1 else K)
    same = i[:, None] == i[None, :]
    return same[None, :, None, :].expand(K, V, K, V) if axis == 1 else same[:, None, :, None].expand(K, V, K, V)


def _kind(jacobian: str) -> str:
    if jacobian.startswith("block-diagonal by "):
        return jacobian.split()[2].rstrip("s")   # column | row
    return "elementwise" if jacobian.startswith(("diagonal", "block-diagonal (k=")) else "dense"


@pytest.mark.parametrize("src,index", _nonlinear_stages())
def test_claimed_jacobian_structure_holds(src, index):
    spec = recdsl.load(src)
    plan = spec(backend="reference", **spec.analysis_dims()).compiled.plan
    stage = plan.stages[index]
    kind = _kind(stage.jacobian)
    blocks = [_jacobians(plan.ir, stage.states, seed) for seed in (1, 2)]
    nonzero = {k: (blocks[0][k] != 0) | (blocks[1][k] != 0) for k in blocks[0]}
    if kind != "dense":
        for (o, i), nz in nonzero.items():
            outside = nz & ~_allowed(kind, *(tuple(plan.ir.shape_of(plan.ir.states[s])) for s in (o, i)))
            assert not outside.any(), (stage.jacobian, o, i)
        return
    # dense: no structure the analysis knows would have held
    candidates = ["elementwise"] + (["column", "row"] if all(plan.ir.states[s].rank == 2 for s in stage.states) else [])
    for kind in candidates:
        held = all(not (nz & ~_allowed(kind, *(tuple(plan.ir.shape_of(plan.ir.states[s])) for s in (o, i)))).any()
                   for (o, i), nz in nonzero.items() if plan.ir.states[o].shape == plan.ir.states[i].shape)
        same_shapes = len({tuple(plan.ir.states[s].shape) for s in stage.states}) == 1
        assert not (held and same_shapes), f"{src}: called dense, but {kind}-local numerically"


@pytest.mark.parametrize("name,claim", [("rows", "block-diagonal by rows (3 blocks of 4x4)"), ("dense", "dense"),
                                        ("columns by transposes", "block-diagonal by columns (4 blocks of 3x3)"),
                                        ("where", "diagonal")])
def test_jacobian_locality_is_found(name, claim):
    spec = recdsl.load(INLINE[name])
    dims = {d: n for d, n in dict(K=3, V=4).items() if d in spec.cell.dims}
    assert spec(backend="reference", **spec.analysis_dims(**dims)).compiled.plan.stages[0].jacobian == claim


def test_yaad_memory_is_block_diagonal_by_columns_and_names_clamp():
    spec = recdsl.load(str(ROOT / "benchmarks" / "cells" / "yaad.rec"))
    stage = spec(backend="reference", K=3, V=4).compiled.plan.stages[0]
    assert stage.jacobian == "block-diagonal by columns (4 blocks of 3x3)"
    assert stage.reason.startswith("M' applies clamp (line")
