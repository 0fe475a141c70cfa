"""layer.step() on the torch backend: a cell that is one lane loop decodes with one C call
per token (fused_loop.FusedStep); it must equal the reference's step, token after token,
for every stdlib sequence cell it takes, at sizes that leave vector tails and odd batches."""
from __future__ import annotations

import glob
import os

import pytest
import torch

import recdsl
from recdsl.backends.torch.fused_loop import FusedStep

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "stdlib")
CELLS = sorted({os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{ROOT}/**/*.rec", recursive=True)})


def _fused_cells() -> list[str]:
    out = []
    for name in CELLS:
        spec = recdsl.load(name)
        if spec.cell.over != "seq":
            continue
        layer = spec(backend="torch", **spec.analysis_dims())
        if isinstance(layer._step_fn, FusedStep):
            out.append(name)
    return out


FUSED = _fused_cells()


def test_the_recurrent_cells_decode_fused():
    assert {"lstm", "gru", "elman", "lstm_peephole", "slstm"} <= set(FUSED)


def _odd_dims(spec) -> dict:
    """Sizes that are not multiples of a vector (tails in the dot products)."""
    dims = dict(spec.analysis_dims())
    for k in dims:
        if k in ("D", "H", "K", "V", "M", "N"):
            dims[k] = {"D": 19, "H": 37}.get(k, 21)
    return dims


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("name", FUSED)
def test_step_equals_the_reference_step(name, B, dtype):
    spec = recdsl.load(name)
    torch.manual_seed(0)
    try:
        dims = _odd_dims(spec)
        fused = spec(backend="torch", **dims).to(dtype)
    except recdsl.RecError:          # the cell constrains its dims: its analysis sizes then
        dims = spec.analysis_dims()
        fused = spec(backend="torch", **dims).to(dtype)
    ref = spec(backend="reference", **dims).double()      # the truth: float64 reference steps
    ref.load_state_dict(fused.state_dict())
    ref32 = spec(backend="reference", **dims).to(dtype)     # what float32 costs the reference itself
    ref32.load_state_dict(fused.state_dict())
    assert isinstance(fused._step_fn, FusedStep)
    heads = (fused.heads,) if fused.heads else ()
    state = {s: torch.randn((B,) + heads + tuple(fused.ir.shape_of(n)), dtype=torch.float64) * 0.5
             for s, n in fused.ir.states.items()}
    s_fused, s_ref, s_ref32 = ({s: v.to(dtype) for s, v in state.items()}, dict(state),
                               {s: v.to(dtype) for s, v in state.items()})
    with torch.no_grad():
        for _ in range(3):
            xs = {n: torch.randn((B,) + heads + tuple(fused.ir.shape_of(x)), dtype=torch.float64)
                  for n, x in fused.ir.inputs.items()}
            out_f, s_fused = fused.step(s_fused, **{n: x.to(dtype) for n, x in xs.items()})
            out_r, s_ref = ref.step(s_ref, **xs)
            out_r32, s_ref32 = ref32.step(s_ref32, **{n: x.to(dtype) for n, x in xs.items()})
            pairs = [(out_f, out_r32, out_r)] + [(s_fused[s], s_ref32[s], s_ref[s]) for s in s_ref]
            for got, theirs, truth in pairs:
                err = (got.double() - truth).abs().max().item()
                if dtype == torch.float64:
                    assert err <= 1e-11 * (1 + truth.abs().max().item()), (name, err)
                else:   # no worse than the reference's own float32 steps (exp gates amplify rounding)
                    allowed = 4 * (theirs.double() - truth).abs().max().item() + 1e-5 * (1 + truth.abs().max().item())
                    assert err <= allowed, (name, err, allowed)


def test_step_with_gradients_runs_the_differentiable_step():
    spec = recdsl.load("lstm")
    layer = spec(backend="torch", D=5, H=6).double()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    out, state = layer.step(None, x=x)
    out.sum().backward()
    assert x.grad is not None and layer.W_ih.grad is not None and layer.W_hh.grad is not None
    with torch.no_grad():
        again, _ = layer.step(None, x=x)
    torch.testing.assert_close(again, out.detach())
