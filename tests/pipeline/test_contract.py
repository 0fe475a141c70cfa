"""LANGUAGE.md §5-6: every contract example is classified as its comment states, and the
sequence cells run on the reference backend."""
import pytest
import torch

import recdsl.lowering as L
import recdsl
from recdsl import plan as P

from helpers import language_examples

EXPECTED = {
    "LSTM": {"h": P.NONLINEAR, "c": P.NONLINEAR},
    "MinGRU": {"h": P.DIAGONAL},
    "GLA": {"S": P.DIAGONAL},
    "SelectiveSSM": {"h": P.DIAGONAL},
    "MLSTM": {"m": P.SEMIRING, "C": P.DIAGONAL, "n": P.DIAGONAL},
    "GatedDeltaNet": {"S": P.LOW_RANK},
    "DeltaProduct": {"S": P.LOW_RANK},
    "LRU": {"hr": P.BLOCK_DIAGONAL, "hi": P.BLOCK_DIAGONAL},
    "SLSTM": {"c": P.NONLINEAR, "n": P.NONLINEAR, "m": P.NONLINEAR, "y": P.NONLINEAR},
    "PLSTM2D": {"Cr": P.DAG_LINEAR, "Cd": P.DAG_LINEAR},
    "PLSTMGraph": {"C": P.DAG_LINEAR},
    "TreeLSTM": {"h": P.NONLINEAR, "c": P.NONLINEAR},
}
NAMES = sorted(EXPECTED)


def test_every_example_has_an_expectation(examples):
    from helpers import LANGUAGE_MD
    if LANGUAGE_MD.exists():
        assert set(examples) == set(EXPECTED)
    else:  # a lone clone: the stdlib holds copies of the examples
        assert set(EXPECTED) <= set(examples)


@pytest.mark.parametrize("name", NAMES)
def test_classification(examples, name):
    plan = recdsl.load(examples[name]).plan()
    assert plan.classes() == EXPECTED[name]
    for s in plan.stages:  # every stage explains itself
        assert s.reason and isinstance(plan.form(s.index), L.Form)


def test_details(examples):
    plan = lambda n: recdsl.load(examples[n]).plan()  # noqa: E731
    gla = plan("GLA").stage_of("S")
    assert gla.decay == "vector" and isinstance(plan("GLA").selected("torch", gla.index), L.ChunkDiag)
    assert plan("GLA").outputs[0].kind == "linear readout"
    ssm = plan("SelectiveSSM")
    assert ssm.stage_of("h").decay == "elementwise" and isinstance(ssm.form(ssm.stage_of("h").index), L.ElementScan)
    assert ssm.outputs[0].kind == "linear readout"
    ml = plan("MLSTM")
    assert ml.stage_of("m").detail.startswith("max-plus")
    assert [s.states for s in ml.stages] == [["m"], ["C"], ["n"]]  # m first: C and n are given m
    assert "given m" in ml.stage_of("C").detail and ml.stage_of("C").decay == "scalar"
    assert ml.outputs[0].kind == "epilogue"
    gdn = plan("GatedDeltaNet").stage_of("S")
    assert gdn.rank == 1 and gdn.decay == "scalar"
    dp = plan("DeltaProduct").stage_of("S")
    assert dp.rank == 2 and dp.decay == "identity"
    assert plan("LRU").stage_of("hr").block == 2
    sl = plan("SLSTM").stage_of("c")
    assert sl.jacobian == "dense" and "R @ y" in sl.jacobian_reason


def test_verification_checks_pass(examples):
    for name in NAMES:
        for s in recdsl.load(examples[name]).plan().stages:
            for c in s.checks:
                assert "FAILED" not in c and "NOT" not in c, (name, c)
                if "max err" in c:
                    assert float(c.rsplit("max err", 1)[1].split()[0]) < 1e-12, (name, c)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("PLSTM2D", "PLSTMGraph", "TreeLSTM")])
def test_runs_on_reference(examples, name):
    spec = recdsl.load(examples[name])
    dims = spec.analysis_dims()
    layer = spec(backend="reference", **dims)
    torch.manual_seed(0)
    B, T = 2, 5
    heads = (layer.heads,) if layer.heads else ()
    xs = {n: torch.randn((B, T) + heads + layer.ir.concrete(v.shape)) * 0.5 for n, v in spec.cell.inputs.items()}
    out, state = layer(**xs)
    outs = out if isinstance(out, tuple) else (out,)
    for o, info in zip(outs, spec.cell.outputs):
        assert o.shape == (B, T) + heads + layer.ir.concrete(info.type.shape)
        assert torch.isfinite(o).all()
    assert set(state) == set(spec.cell.states)


@pytest.mark.parametrize("name", ["PLSTM2D", "PLSTMGraph", "TreeLSTM"])
def test_grid_and_dag_cells_run_on_torch_by_default(examples, name):
    spec = recdsl.load(examples[name])
    layer = spec(**spec.analysis_dims())  # auto: torch runs grids (wavefront) and DAGs (level-synchronous)
    assert layer.backend_name == "torch"
    assert spec(backend="reference", **spec.analysis_dims()).backend_name == "reference"
