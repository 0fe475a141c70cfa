"""torch.compile(fullgraph=True) on a model holding recdsl layers (recdsl/torch_compile.py):
each layer call is one opaque custom op (recdsl::layer_forward, its backward
recdsl::layer_backward), so Dynamo traces the model without a graph break; outputs,
final states and gradients (inputs, initial states, every param) equal eager mode."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.errors import RecError


class LstmGla(torch.nn.Module):
    """A recdsl LSTM (D=H=16) whose outputs, projected, feed a recdsl GLA (2 heads, K=V=8)."""

    def __init__(self):
        super().__init__()
        self.lstm = recdsl.load("lstm")(D=16, H=16, backend="torch")
        self.proj = torch.nn.Linear(16, 4 * 16)
        self.gla = recdsl.load("gla")(K=8, V=8, heads=2, backend="torch")

    def forward(self, x, lstm_state=None, gla_state=None):
        h, st1 = self.lstm(x=x, state=lstm_state)
        B, T = h.shape[:2]
        q, k, v, g = self.proj(h).view(B, T, 4, 2, 8).unbind(2)
        o, st2 = self.gla(q=q, k=k, v=v, gk=F.logsigmoid(g) / 4, state=gla_state)
        return o, st1, st2


def _flat(out):
    o, st1, st2 = out
    return [o] + [st1[k] for k in sorted(st1)] + [st2[k] for k in sorted(st2)]


def _run(model, args, seed):
    """Outputs and final states, and the gradients of a loss over all of them with respect to
    the tensor arguments and every param."""
    model.zero_grad(set_to_none=True)
    leaves = [a.detach().requires_grad_() for a in args]
    pos = [leaves[0]] + [None] * 2
    kw = {}
    if len(leaves) > 1:
        kw = {"lstm_state": {"h": leaves[1], "c": leaves[2]}, "gla_state": {"S": leaves[3]}}
    outs = _flat(model(pos[0], **kw))
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = [a.grad for a in leaves] + [p.grad for p in model.parameters()]
    return [o.detach() for o in outs], grads


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x is not None and y is not None
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def _args(B, T, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 16, generator=gen)
    if not with_state:
        return [x]
    return [x, 0.5 * torch.randn(B, 16, generator=gen), 0.5 * torch.randn(B, 16, generator=gen),
            0.1 * torch.randn(B, 2, 8, 8, generator=gen)]


# (B, T, initial states given): a new batch size and length recompile once with dynamic shapes;
# inductor (C++ code generation: about 15 s warm, a minute with a cold cache under load) runs two
CASES = {"inductor": [(3, 20, True), (5, 33, True)],
         "aot_eager": [(3, 20, False), (3, 20, True), (5, 33, True), (2, 7, False)]}


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_lstm_gla_matches_eager(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = LstmGla()
    compiled = torch.compile(model, fullgraph=True, backend=backend)   # a graph break raises
    for i, (B, T, with_state) in enumerate(CASES[backend]):
        args = _args(B, T, with_state, seed=i)
        want = _run(model, args, seed=i)
        ran = (model.lstm.ran, model.gla.ran)
        got = _run(compiled, args, seed=i)
        assert (model.lstm.ran, model.gla.ran) == ran    # the ops ran the eager kernels
        _close(want[0], got[0])    # outputs and final states
        _close(want[1], got[1])    # gradients: inputs, initial states, every param


def test_no_graph_break_and_two_opaque_ops_per_layer():
    torch._dynamo.reset()
    model = LstmGla()
    x = torch.randn(2, 9, 16)
    report = torch._dynamo.explain(model)(x)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
    targets = [str(n.target) for g in report.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count("recdsl.layer_forward.default") == 2, targets


def test_backward_op_in_the_compiled_graph():
    """The joint graph holds the backward op; AOTAutograd sees no Python of the layer."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    seen = []

    def backend(gm, example_inputs):
        def fw(g, _):
            seen.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw, bw_compiler=fw)

    torch._dynamo.reset()
    model = LstmGla()
    out = torch.compile(model, fullgraph=True, backend=backend)(torch.randn(2, 9, 16, requires_grad=True))
    sum(o.sum() for o in _flat(out)).backward()
    assert seen.count("recdsl.layer_forward.default") == 2
    assert seen.count("recdsl.layer_backward.default") == 2


def _cell_case(name):
    """(layer, inputs, state, forward options) for one cell of the modes test."""
    gen = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=gen)   # noqa: E731
    if name == "hmm_forward":     # a learned initial state (alpha = log_pi), two outputs
        return recdsl.load(name)(N=4, backend="torch"), {"logB": r(2, 6, 4)}, None, {}
    if name == "s5":              # a complex state: entries x.re, x.im
        return (recdsl.load(name)(H=4, P=4, backend="torch"), {"u": r(2, 6, 4)},
                {"x.re": r(2, 4), "x.im": r(2, 4)}, {"reverse": True})
    if name == "gla-cu":          # cu_seqlens as a list, natively in the kernel
        q = r(1, 9, 2, 4)
        return (recdsl.load("gla")(K=4, V=4, heads=2, backend="torch"), dict(q=q, k=q, v=q, gk=-q.abs()), None,
                {"cu_seqlens": [0, 4, 9]})
    q = r(1, 9, 4)                # lstm-cu: cu_seqlens as a tensor, reverse, initial states
    return (recdsl.load("lstm")(D=4, H=4, backend="torch"), {"x": q}, {"h": r(2, 4), "c": r(2, 4)},
            {"cu_seqlens": torch.tensor([0, 3, 9]), "reverse": True})


@pytest.mark.parametrize("name", ["hmm_forward", "s5", "gla-cu", "lstm-cu"])
def test_modes_under_compile(name):
    """Learned initial states, complex states, reverse and cu_seqlens pass through the op:
    outputs, final states and every gradient equal eager mode."""
    torch.manual_seed(0)
    layer, inputs, state, opts = _cell_case(name)

    def f(layer, inputs, state):
        o, st = layer(**inputs, state=state, **opts)
        return list(o if isinstance(o, tuple) else (o,)) + [st[k] for k in sorted(st)]

    torch._dynamo.reset()
    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        xs = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        st = None if state is None else {k: v.detach().requires_grad_() for k, v in state.items()}
        outs = fn(layer, xs, st)
        gen = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
        grads = [v.grad for v in xs.values()] + ([v.grad for v in st.values()] if st else [])
        results.append(([o.detach() for o in outs], grads + [p.grad for p in layer.parameters()], layer.ran))
    (o1, g1, ran1), (o2, g2, ran2) = results
    _close(o1, o2)
    _close(g1, g2)
    assert ran1 == ran2 and ran2    # the op ran the same kernels as eager mode


def test_bf16_and_functional_call():
    """bf16 inputs give bf16 outputs; params swapped by torch.func.functional_call reach the op."""
    torch.manual_seed(1)
    layer = recdsl.load("gla")(K=8, V=8, heads=2, backend="torch")
    f = torch.compile(lambda q: layer(q=q, k=q, v=q, gk=-q.float().abs().to(q.dtype))[0], fullgraph=True,
                      backend="aot_eager")
    qb = torch.randn(2, 6, 2, 8).bfloat16()
    got = f(qb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, layer(q=qb, k=qb, v=qb, gk=-qb.float().abs().bfloat16())[0])
    lstm = recdsl.load("lstm")(D=4, H=4, backend="torch")
    other = {n: torch.randn_like(p) for n, p in lstm.named_parameters()}
    x = torch.randn(2, 5, 4)
    g = torch.compile(lambda x, p: torch.func.functional_call(lstm, p, (), {"x": x})[0], fullgraph=True,
                      backend="aot_eager")
    want = torch.func.functional_call(lstm, other, (), {"x": x})[0]
    torch.testing.assert_close(g(x, other), want)
    assert not torch.allclose(want, lstm(x=x)[0])


def test_grid_cell_runs_eagerly_with_a_graph_break():
    """Cells over grids and DAGs are not in the op: a plain torch.compile runs them eagerly
    (a graph break), fullgraph=True says so."""
    layer = recdsl.load("plstm2d")(K=4, V=4, backend="torch")
    kw = {n: torch.randn(1, 3, 3, 4) for n in ("q", "k", "v")}
    kw.update({n: torch.rand(1, 3, 3) for n in ("s_r", "s_d", "t_rl", "t_ru", "t_dl", "t_du", "m_l", "m_u", "d")})
    torch._dynamo.reset()
    got = torch.compile(lambda kw: layer(**kw)[0], backend="aot_eager")(kw)
    torch.testing.assert_close(got, layer(**kw)[0])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="disable"):
        torch.compile(lambda kw: layer(**kw)[0], backend="aot_eager", fullgraph=True)(kw)


def test_errors_and_copies_under_compile():
    """A wrong shape is the eager RecError at trace time; a deep copy is its own layer."""
    layer = recdsl.load("lstm")(D=4, H=4, backend="torch")
    torch._dynamo.reset()
    f = torch.compile(lambda layer, x: layer(x=x)[0], fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="input x has shape"):
        f(layer, torch.randn(2, 5, 3))
    twin = copy.deepcopy(layer)
    assert twin._compile_sig.handle != layer._compile_sig.handle
    with torch.no_grad():
        twin.W_hh.mul_(-1)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(f(layer, x), layer(x=x)[0])
    torch.testing.assert_close(f(twin, x), twin(x=x)[0])
    assert not torch.allclose(f(twin, x), f(layer, x))
    with pytest.raises(RecError):
        layer(x=torch.randn(2, 5, 3))   # eager unchanged


class _Forbidden:
    """A lock or function that must not be touched."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        raise AssertionError(f"{self.what} taken on a compiled forward")

    def __exit__(self, *exc):
        return False

    def __call__(self, *a, **k):
        raise AssertionError(f"{self.what} called on a compiled forward")

    acquire = __call__


def test_no_cache_access_or_lock_per_compiled_forward(monkeypatch):
    """Once a layer has run, a compiled forward and backward touch neither the kernel cache
    (files, its lock) nor the scan library's lock, and build nothing."""
    import subprocess

    from recdsl.backends.torch import cpu_kernels, kcache
    torch._dynamo.reset()
    model = LstmGla()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    args = _args(3, 20, True, seed=0)
    want = _run(model, args, seed=0)                       # builds / loads the libraries
    for name in ("load_library", "store_file", "_lock"):
        monkeypatch.setattr(kcache, name, _Forbidden(f"kcache.{name}"))
    monkeypatch.setattr(cpu_kernels, "_lock", _Forbidden("cpu_kernels._lock"))
    monkeypatch.setattr(subprocess, "run", _Forbidden("subprocess.run"))
    for _ in range(2):
        got = _run(compiled, args, seed=0)
        _close(want[0], got[0])
        _close(want[1], got[1])
