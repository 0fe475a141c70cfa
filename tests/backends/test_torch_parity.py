"""The torch backend agrees with the reference backend on every sequence cell of the
stdlib, the examples and LANGUAGE.md: outputs, final states and gradients in float64;
outputs in float32 within fla-style tolerances; across T (chunk edges), heads, reverse,
cu_seqlens and initial states."""
import pytest
import torch

from recdsl.lowering import SequentialLoop
import recdsl
from helpers import compare_backends, language_examples, random_inputs, as_tuple, ROOT

def _cells():
    out = {}
    for name, src in language_examples().items():
        out[f"lang:{name}"] = src
    from recdsl.spec import stdlib_files
    for name, path in stdlib_files().items():
        out[f"stdlib:{name}"] = path
    for path in sorted((ROOT / "examples").glob("*.rec")):
        out[f"example:{path.stem}"] = path
    for path in sorted((ROOT / "tests" / "analysis" / "cells").glob("*.rec")):  # cells written by others
        out[f"unseen:{path.stem}"] = path
    return {k: v for k, v in out.items() if recdsl.load(v).cell.over == "seq"}


CELLS = _cells()


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("T", [1, 17, 70])
def test_float64_parity(name, T):
    spec = recdsl.load(CELLS[name])
    errs = compare_backends(spec, spec.analysis_dims(), "torch", B=2, T=T)
    assert errs["out"] < 1e-9 and errs["state"] < 1e-9 and errs["grad"] < 1e-8, errs


@pytest.mark.parametrize("name", sorted(CELLS))
def test_float32_parity(name):
    spec = recdsl.load(CELLS[name])
    errs = compare_backends(spec, spec.analysis_dims(), "torch", B=2, T=40, dtype=torch.float32, grads=False)
    assert errs["out"] <= 1e-4 * max(1.0, errs["scale"]) and errs["state"] < 1e-3, errs


@pytest.mark.parametrize("cell", ["gla", "mlstm", "gated_deltanet", "mingru", "lru", "lstm"])
def test_heads_reverse_and_initial_state(cell):
    spec = recdsl.load(cell)
    dims = spec.analysis_dims()
    errs = compare_backends(spec, dims, "torch", B=2, T=23, heads=2, reverse=True)
    assert errs["out"] < 1e-9 and errs["state"] < 1e-9 and errs["grad"] < 1e-8, errs
    ref = spec(backend="reference", heads=2, **dims).double()
    fast = spec(backend="torch", heads=2, **dims).double()
    fast.load_state_dict(ref.state_dict())
    xs = random_inputs(spec, ref, 2, 9, torch.float64, seed=5)
    _, st = ref(**xs)
    st = {k: v + 0.1 for k, v in st.items()}
    o1, s1 = ref(**xs, state=st)
    o2, s2 = fast(**xs, state=st)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(as_tuple(o1), as_tuple(o2)))
    assert all(torch.allclose(s1[k], s2[k], atol=1e-10) for k in s1)


@pytest.mark.parametrize("cell", ["gla", "mlstm", "lstm", "gated_deltanet"])
def test_cu_seqlens(cell):
    spec = recdsl.load(cell)
    dims = spec.analysis_dims()
    layer = spec(backend="torch", **dims).double()
    xs = random_inputs(spec, layer, 1, 20, torch.float64, seed=7)
    cu = [0, 3, 3, 12, 20]
    out, st = layer(**xs, cu_seqlens=torch.tensor(cu))
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        if b == a:
            continue
        o, s = layer(**{k: v[:, a:b] for k, v in xs.items()})
        assert all(torch.allclose(x[:, a:b], y) for x, y in zip(as_tuple(out), as_tuple(o)))
        assert all(torch.allclose(st[k][i], s[k][0]) for k in s)


def test_bf16_inputs_give_bf16_outputs_and_fp32_state():
    layer = recdsl.load("gla")(K=8, V=8)
    q = torch.randn(2, 33, 8).bfloat16()
    o, st = layer(q=q, k=q, v=q, gk=-torch.rand(2, 33, 8).bfloat16())
    assert o.dtype == torch.bfloat16 and st["S"].dtype == torch.float32


@pytest.mark.parametrize("cell, gate", [("mingru", None), ("gla", "strong"), ("gla", "weak"), ("mlstm", "exp"),
                                        ("mamba", None), ("gated_deltanet", "strong")])
def test_long_sequences_stay_finite(cell, gate):
    spec = recdsl.load(cell)
    dims = {k: 4 for k in spec.analysis_dims()}
    layer = spec(backend="torch", **dims)
    T = 65536
    xs = random_inputs(spec, layer, 1, T, torch.float32, seed=11, scale=1.0)
    if gate == "strong":
        for k in ("gk", "g"):
            if k in xs:
                xs[k] = torch.full_like(xs[k], -30.0)
    elif gate == "weak":
        xs["gk"] = torch.full_like(xs["gk"], -1e-6)
    elif gate == "exp":
        xs["ig"] = torch.randn(1, T) * 10 + 20  # large exponential input gates: the stabiliser must hold
    with torch.no_grad():
        out, st = layer(**xs)
    assert all(torch.isfinite(o).all() for o in as_tuple(out))
    assert all(torch.isfinite(v).all() for v in st.values())


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_parity(name, dtype):
    """Without gradients the backend takes its inference kernels (fused C steps for loops,
    in-cache matrix-state kernels); they must agree with the reference too."""
    spec = recdsl.load(CELLS[name])
    dims = spec.analysis_dims()
    heads = None if spec.cell.heads is not None else 2  # cells with a heads clause bring their own
    ref = spec(backend="reference", heads=heads, **dims).to(dtype)
    fast = spec(backend="torch", heads=heads, **dims).to(dtype)
    fast.load_state_dict(ref.state_dict())
    xs = random_inputs(spec, ref, 3, 37, dtype, seed=9)
    with torch.no_grad():
        o1, s1 = ref(**xs)
        o2, s2 = fast(**xs)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for a, b in zip(as_tuple(o1), as_tuple(o2)):
        assert torch.allclose(a, b, atol=tol, rtol=tol), float((a - b).abs().max())
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=tol, rtol=tol), (k, float((s1[k] - s2[k]).abs().max()))


def _torch_loop_only(ir, states, core):
    from recdsl.backends.torch.fused_loop import NotEligible
    raise NotEligible("the test asks for the torch loop")


@pytest.mark.parametrize("kernel", ["torch.c_loop", "torch.loop"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "slstm", "titans"])
def test_loop_backward_passes_gradcheck(cell, kernel, monkeypatch):
    """Sequential stages backpropagate through the C loop's generated reverse-time adjoint
    (torch.c_loop), or run_loop's reverse loop of per-step VJPs (torch.loop, where the C
    loop is declined); both pass gradcheck, and every param gets a gradient."""
    from recdsl.backends.torch import fused_loop, kernels
    if kernel == "torch.c_loop" and fused_loop.toolchain_missing():
        pytest.skip(fused_loop.toolchain_missing())
    if kernel == "torch.loop":
        monkeypatch.setattr(kernels, "compiled_loop", _torch_loop_only)
    spec = recdsl.load(cell)
    dims = {k: 2 for k in spec.analysis_dims()}
    layer = spec(backend="torch", **dims).double()
    assert [c.kernel.name for c in layer.selection.stages if isinstance(c.form, SequentialLoop)] == [kernel]
    xs = random_inputs(spec, layer, 2, 4, torch.float64, seed=3)
    names = list(xs)
    params = list(layer.parameters())

    def f(*tensors):
        out, st = layer(**dict(zip(names, tensors)))
        return tuple(as_tuple(out)) + tuple(st.values())
    assert torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in xs.values()), atol=1e-7)
    out, st = layer(**xs)
    (sum(o.sum() for o in as_tuple(out)) + sum(v.sum() for v in st.values())).backward()
    assert all(p.grad is not None for p in params)
    assert layer.ran == [c.kernel.name for c in layer.selection.stages]


@pytest.mark.parametrize("heads,NH", [(None, 2), (2, 3)])
def test_deltaproduct_runs_chunkwise(heads, NH):
    """DeltaProduct's Householder steps are found in the update and interleaved into one
    chunkwise delta rule (T * NH steps), read out after each token's last step."""
    spec = recdsl.load("deltaproduct")
    dims = dict(K=8, V=6, NH=NH)
    layer = spec(backend="torch", heads=heads, **dims)
    assert "scans.delta_product_stage(" in layer.generated and "seq_rt.run_loop(" not in layer.generated
    for grads in (True, False):   # chunkwise with autograd; the C kernel without
        e = compare_backends(spec, dims, "torch", B=2, T=70, dtype=torch.float64, heads=heads, grads=grads)
        assert max(v for k, v in e.items() if k != "scale") <= 1e-11 * max(1.0, e["scale"]), e
