"""DAGs with sparse pair inputs, grids scanned from every corner, heads over grids and DAGs,
and the errors of a wrong graph -- on the reference (float64 loops, the oracle), torch
(torch.level_sync, torch.c_grid / torch.wavefront) and triton (which borrows torch's graph
kernels).

A `pair` input is [B, NP, ...] in recdsl.graph.line_pairs(edges)' order; checked against a
brute-force enumeration, against pLSTM written out on a path (where the graph form is the
1-D recurrence), and for memory: a 20k-edge tree runs with no op making anything near E²
elements."""
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import recdsl
from recdsl.graph import line_pairs

DT = torch.float64


def _layers(spec, backends=("reference", "torch"), **dims):
    """One layer per backend with the reference's params."""
    ref = spec(backend="reference", **dims).double()
    out = [ref]
    for b in backends[1:]:
        other = spec(backend=b, **dims).double()
        other.load_state_dict(ref.state_dict())
        out.append(other)
    return out


def _run(layer, inputs: dict, around=lambda v: v, **kw):
    """(every returned tensor, their gradients wrt inputs and params) for one random projection;
    `around` is applied to the inputs before the call and to the results after it."""
    xs = {n: x.detach().clone().requires_grad_(True) for n, x in inputs.items()}
    y, st = layer(**{n: around(x) for n, x in xs.items()}, **kw)
    vals = [around(v) for v in ((y,) if isinstance(y, torch.Tensor) else tuple(y)) + tuple(st[s] for s in sorted(st))
            if v is not None and v.numel()]
    g = torch.Generator().manual_seed(11)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=DT)).sum() for v in vals)
    params = [p for _, p in sorted(layer.named_parameters())]
    grads = torch.autograd.grad(loss, list(xs.values()) + params, allow_unused=True)
    return vals, [torch.zeros((), dtype=DT) if g is None else g for g in grads]


def _close(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = torch.broadcast_tensors(x, y)
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-11), (x - y).abs().max()


def _agree(layers, inputs, **kw):
    want_vals, want_grads = _run(layers[0], inputs, **kw)
    for layer in layers[1:]:
        vals, grads = _run(layer, inputs, **kw)
        _close(vals, want_vals)
        _close(grads, want_grads)


# ---------------------------------------------------------------------- graphs
def _random_dag(N, seed, p=0.4):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)   # node numbers not in topological order
    return torch.tensor([(int(perm[u]), int(perm[v])) for v in range(N) for u in range(v)
                         if torch.rand(1, generator=g) < p], dtype=torch.long).reshape(-1, 2)


def _random_tree(N, seed):
    """children -> parent, node numbers shuffled: a random recursive tree (depth ~ e ln N)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    parent = (torch.rand(N, generator=g) * torch.arange(N)).long()   # node c's parent: uniform in 0..c-1
    return torch.stack([perm[1:], perm[parent[1:]]], 1)


GRAPHS = {
    "random dag": lambda: _random_dag(8, 3),
    "tree": lambda: _random_tree(10, 5),
    "path": lambda: torch.tensor([(i, i + 1) for i in range(7)]),
    "no edges": lambda: torch.zeros((0, 2), dtype=torch.long),
}


def _nodes(edges, default=4):
    return 1 + int(edges.max()) if edges.numel() else default


def _plstm_inputs(edges, B=2, K=2, V=3, heads=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    N, E, NP = _nodes(edges), edges.shape[0], line_pairs(edges).shape[0]
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)   # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=DT)    # noqa: E731
    return {"q": r(B, N, *heads, K), "k": r(B, N, *heads, K), "v": r(B, N, *heads, V), "d": u(B, N, *heads),
            "s": u(B, E, *heads), "m": u(B, E, *heads), "t": u(B, NP, *heads)}


def test_line_pairs_is_every_meeting_pair_by_node_then_in_then_out_edge():
    edges = _random_dag(9, 1, p=0.5)
    want = sorted((int(b), a, o) for a, (_, b) in enumerate(edges.tolist()) for o, (c, _) in enumerate(edges.tolist())
                  if c == b)
    got = line_pairs(edges)
    assert got.dtype == torch.long and got.shape == (len(want), 2)
    assert [tuple(p) for p in got.tolist()] == [(a, o) for _, a, o in want]
    assert line_pairs([]).shape == (0, 2) and line_pairs(edges.tolist()).equal(got)


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_plstm_graph_sparse_pairs_on_every_backend(graph):
    edges = GRAPHS[graph]()
    layers = _layers(recdsl.load("plstm_graph"), ("reference", "torch", "triton"), K=2, V=3)
    _agree(layers, _plstm_inputs(edges), edges=edges)
    assert set(layers[1].ran) == {"torch.level_sync"} and set(layers[2].ran) == {"torch.level_sync"}


def test_dense_pair_table_is_gathered_into_the_sparse_layout():
    edges = _random_dag(7, 2, p=0.6)
    xs = _plstm_inputs(edges)
    E, pairs = edges.shape[0], line_pairs(edges)
    dense = torch.rand(2, E, E, dtype=DT)
    dense[:, pairs[:, 0], pairs[:, 1]] = xs["t"]
    for layer in _layers(recdsl.load("plstm_graph"), K=2, V=3):
        y_sparse, st_sparse = layer(**xs, edges=edges)
        y_dense, st_dense = layer(**{**xs, "t": dense}, edges=edges)
        assert torch.equal(y_sparse, y_dense) and torch.equal(st_sparse["C"], st_dense["C"])


def test_plstm_graph_on_a_path_is_the_1d_recurrence():
    """On the path 0 -> 1 -> ... each node has one in-edge and one out-edge: the edge state of
    edge i (node i -> i+1) is C_i = t_i C_{i-1} + s_i k_i v_iᵀ with t_i the pair (i-1, i)'s
    transition, and y_i = m_{i-1} q_i C_{i-1} + d_i (q_i·k_i) v_i."""
    N, B, K, V = 9, 2, 3, 2
    edges = torch.tensor([(i, i + 1) for i in range(N - 1)])
    assert line_pairs(edges).tolist() == [[i - 1, i] for i in range(1, N - 1)]
    xs = _plstm_inputs(edges, B, K, V, seed=4)
    C_prev = torch.zeros(B, K, V, dtype=DT)
    C_all, y_all = [], []
    for i in range(N):
        q, k, v, d = xs["q"][:, i], xs["k"][:, i], xs["v"][:, i], xs["d"][:, i]
        read = xs["m"][:, i - 1, None, None] * C_prev if i else torch.zeros(B, K, V, dtype=DT)
        y_all.append((q[:, None, :] @ read)[:, 0] + d[:, None] * (q * k).sum(-1, keepdim=True) * v)
        if i < N - 1:
            carried = xs["t"][:, i - 1, None, None] * C_prev if i else 0
            C_prev = carried + xs["s"][:, i, None, None] * k[:, :, None] * v[:, None, :]
            C_all.append(C_prev)
    for layer in _layers(recdsl.load("plstm_graph"), K=K, V=V):
        y, st = layer(**xs, edges=edges)
        assert torch.allclose(y, torch.stack(y_all, 1), atol=1e-12)
        assert torch.allclose(st["C"], torch.stack(C_all, 1), atol=1e-12)


@pytest.mark.parametrize("graph", ["random dag", "tree", "path"])
def test_tree_lstm_on_every_backend(graph):
    edges = GRAPHS[graph]()
    layers = _layers(recdsl.load("tree_lstm"), ("reference", "torch", "triton"), D=3, H=4)
    x = torch.randn(2, _nodes(edges), 3, dtype=DT, generator=torch.Generator().manual_seed(6))
    _agree(layers, {"x": x}, edges=edges)
    assert set(layers[1].ran) == {"torch.level_sync"}


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output has."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_20k_edge_tree_runs_in_memory_linear_in_edges():
    edges = _random_tree(20_000, 8)
    E = edges.shape[0]
    layer = recdsl.load("plstm_graph")(K=2, V=2, backend="torch").double()
    xs = _plstm_inputs(edges, B=1, K=2, V=2, seed=9)
    start = time.perf_counter()
    with _LargestTensor() as seen:
        y, st = layer(**xs, edges=edges)
    took = time.perf_counter() - start
    assert y.shape == (1, E + 1, 2) and st["C"].shape == (1, E, 2, 2) and torch.isfinite(y).all()
    assert seen.largest <= 16 * (E + 1), seen.largest          # [B, E, K, V] is 4 E; E² would be 4e8
    assert took < 60, took
    # spot-check one node against the equations: a leaf's out-edge holds s k vᵀ
    leaves = set(range(E + 1)) - set(edges[:, 1].tolist())
    leaf = min(leaves)
    e = int((edges[:, 0] == leaf).nonzero()[0])
    want = xs["s"][0, e] * xs["k"][0, leaf][:, None] * xs["v"][0, leaf][None, :]
    assert torch.allclose(st["C"][0, e], want, atol=1e-12)


# ---------------------------------------------------------------------- flips
MDRNN = """cell Flip2D(D, H):
    over grid2d
    input x[D]
    param W[4*H, D] ~ normal(0, 1/sqrt(D))
    param Ul[4*H, H] ~ normal(0, 1/sqrt(H))
    param Uu[4*H, H] ~ normal(0, 1/sqrt(H))
    state h[H] = 0
    state c[H] = 0
    i, fl, fu, g = split(W @ x + Ul @ h.left + Uu @ h.up, 4)
    c' = sigmoid(i) * tanh(g) + sigmoid(fl) * c.left + 0.5 * sigmoid(fu) * c.up
    h' = tanh(c')
    output y = h' + 0.25 * h.left
"""

FLIPS = [(False, False), (True, False), (False, True), (True, True)]


def _flip_axes(flip):
    return tuple(a for a, on in zip((1, 2), flip) if on)


@pytest.mark.parametrize("flip", FLIPS)
def test_flipped_grid_is_the_reference_on_the_flipped_grid_flipped_back(flip):
    ref, fast = _layers(recdsl.load(MDRNN), D=2, H=3)
    x = torch.randn(2, 5, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(12))
    axes = _flip_axes(flip)
    # the oracle: the reference's top-left scan of the flipped grid, every result flipped back
    want_vals, want_grads = _run(ref, {"x": x}, around=lambda v: v.flip(axes) if axes else v)
    for layer, kernel in ((ref, None), (fast, "torch.c_grid"), (fast, "torch.wavefront")):
        if kernel == "torch.wavefront":
            fast._program.grid_loop = None
        vals, grads = _run(layer, {"x": x}, flip=flip)
        _close(vals, want_vals)
        _close(grads, want_grads)
        assert kernel is None or set(layer.ran) == {kernel}
    if axes:   # a flip changes the result (the scan is not symmetric)
        assert not torch.allclose(ref(x=x, flip=flip)[0], ref(x=x)[0])


def test_flipped_plstm2d_matches_the_reference():
    ref, fast = _layers(recdsl.load("plstm2d"), K=2, V=2)
    g = torch.Generator().manual_seed(13)
    xs = {n: torch.randn(1, 4, 3, 2, dtype=DT, generator=g) for n in ("q", "k", "v")}
    xs.update({n: torch.rand(1, 4, 3, dtype=DT, generator=g)
               for n in ("s_r", "s_d", "t_rl", "t_ru", "t_dl", "t_du", "m_l", "m_u", "d")})
    for flip in FLIPS[1:]:
        _agree([ref, fast], xs, flip=flip)


# ---------------------------------------------------------------------- heads
GRID_HEADS = """cell GridHeads(D, NH):
    heads NH
    over grid2d
    input x[D], g[]
    param W[D, D] ~ normal(0, 1/sqrt(D))
    param a[D] ~ uniform(0.2, 0.8)
    state h[D] = 0
    h' = tanh(W @ x + a * h.left + sigmoid(g) * h.up)
    output y = h' * 2.0
"""

DAG_HEADS = """cell DagHeads(K, NH):
    heads NH
    over dag
    input x[K]
    edge  s[]
    pair  t[]
    param W[K, K] ~ normal(0, 1/sqrt(K))
    state h[K] = 0
    state C[K] on edge = 0
    C' = sum_in(t * C) + s * tanh(W @ x)
    h' = tanh(W @ x + sum_in(h) + sum_in(C))
    output y = h'
"""


def _per_head(spec, dims, layer, xs, head_axis, **kw):
    """The heads layer head by head: a layer without heads given head h's params and inputs."""
    single = spec(backend="reference", **{k: v for k, v in dims.items() if k != "NH"}, NH=1).double()
    outs, states = [], []
    for h in range(dims["NH"]):
        with torch.no_grad():
            for name, p in layer.named_parameters():
                getattr(single, name).copy_(p[h:h + 1])
        y, st = single(**{n: x.select(head_axis, h).unsqueeze(head_axis) for n, x in xs.items()}, **kw)
        outs.append(y)
        states.append(st)
    return torch.cat(outs, head_axis), {s: torch.cat([st[s] for st in states], head_axis) for s in states[0]}


def _grid_heads_inputs():
    g = torch.Generator().manual_seed(14)
    return {"x": torch.randn(2, 4, 5, 2, 3, dtype=DT, generator=g), "g": torch.randn(2, 4, 5, 2, dtype=DT, generator=g)}


def test_triton_grid_with_heads_and_a_flip():
    """Triton's grid kernel (run in the interpreter here: slow, so one call) under the same flip
    and heads."""
    ref, tri = _layers(recdsl.load(GRID_HEADS), ("reference", "triton"), D=3, NH=2)
    _agree([ref, tri], _grid_heads_inputs(), flip=(True, True))
    assert tri.ran


@pytest.mark.parametrize("path", ["c", "wavefront"])
def test_heads_over_a_grid(path):
    spec = recdsl.load(GRID_HEADS)
    dims = {"D": 3, "NH": 2}
    ref, fast = _layers(spec, **dims)
    if path == "wavefront":
        fast._program.grid_loop = None
    xs = _grid_heads_inputs()
    _agree([ref, fast], xs)
    _agree([ref, fast], xs, flip=(True, False))
    assert set(fast.ran) == {"torch.c_grid" if path == "c" else "torch.wavefront"}
    y, st = ref(**xs)
    assert y.shape == (2, 4, 5, 2, 3) and st["h"].shape == (2, 4, 5, 2, 3)
    y1, st1 = _per_head(spec, dims, ref, xs, 3)
    assert torch.allclose(y, y1, atol=1e-12) and torch.allclose(st["h"], st1["h"], atol=1e-12)


@pytest.mark.parametrize("graph", ["random dag", "tree"])
def test_heads_over_a_dag(graph):
    spec = recdsl.load(DAG_HEADS)
    dims = {"K": 3, "NH": 2}
    edges = GRAPHS[graph]()
    layers = _layers(spec, ("reference", "torch", "triton"), **dims)
    g = torch.Generator().manual_seed(15)
    N, E, NP = _nodes(edges), edges.shape[0], line_pairs(edges).shape[0]
    xs = {"x": torch.randn(2, N, 2, 3, dtype=DT, generator=g), "s": torch.rand(2, E, 2, dtype=DT, generator=g),
          "t": torch.rand(2, NP, 2, dtype=DT, generator=g)}
    _agree(layers, xs, edges=edges)
    y, st = layers[1](**xs, edges=edges)
    assert y.shape == (2, N, 2, 3) and st["C"].shape == (2, E, 2, 3)
    y1, st1 = _per_head(spec, dims, layers[0], xs, 2, edges=edges)
    assert torch.allclose(y, y1, atol=1e-12) and torch.allclose(st["C"], st1["C"], atol=1e-12)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_graph_errors(backend):
    layer = recdsl.load("plstm_graph")(K=2, V=2, backend=backend).double()
    edges = torch.tensor([(0, 1), (1, 2), (0, 2)])
    xs = _plstm_inputs(edges, B=1, K=2, V=2)
    layer(**xs, edges=edges)   # the well-formed call runs

    def fails(match, edges=edges, **change):
        with pytest.raises(recdsl.RecError, match=match) as info:
            layer(**{**xs, **change}, edges=edges)
        assert info.value.hint, str(info.value)
        return info.value

    cyclic = torch.tensor([(0, 1), (1, 2), (2, 3), (3, 1)])
    err = fails(r"cycle through node [123] ", edges=cyclic, **_plstm_inputs(cyclic, B=1, K=2, V=2))
    assert "over dag the graph must be acyclic" in str(err)
    fails(r"edge 1 = \(1, 7\) is not between two distinct nodes of 0..2", edges=[(0, 1), (1, 7), (0, 2)])
    fails(r"edge 0 = \(-1, 1\)", edges=[(-1, 1), (1, 2), (0, 2)])
    fails(r"edge 2 = \(2, 2\)", edges=[(0, 1), (1, 2), (2, 2)])
    fails(r"edges must be \[E, 2\] \(source, target\), got shape \[3, 3\]", edges=torch.zeros(3, 3, dtype=torch.long))
    fails(r"one graph per batch is not supported", edges=edges[None].expand(2, 3, 2))
    fails(r"integer node ids", edges=edges.double())
    fails(r"give its edges", edges=None)
    fails(r"edge input s has shape \[1, 4\], expected \[B, E\] = \[1, 3\]", s=torch.rand(1, 4, dtype=DT))
    err = fails(r"pair input t has shape \[1, 3\], expected \[B, NP\] = \[1, 1\]", t=torch.rand(1, 3, dtype=DT))
    assert "recdsl.graph.line_pairs(edges)" in err.hint
    fails(r"input k has shape \[1, 4, 2\], expected \[B, N, 2\] = \[1, 3, 2\]", k=torch.randn(1, 4, 2, dtype=DT))
    with pytest.raises(recdsl.RecError, match="flip= is for cells that run `over grid2d`"):
        layer(**xs, edges=edges, flip=(True, False))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_grid_option_errors(backend):
    layer = recdsl.load(MDRNN)(D=2, H=2, backend=backend)
    x = torch.randn(1, 3, 3, 2)
    for bad in [True, (True,), (True, "no"), "x"]:
        with pytest.raises(recdsl.RecError, match="flip"):
            layer(x=x, flip=bad)
    with pytest.raises(recdsl.RecError, match="reverse= is for cells that run over sequences"):
        layer(x=x, reverse=True)
    with pytest.raises(recdsl.RecError, match="edges= is for cells that run `over dag`"):
        layer(x=x, edges=[(0, 1)])
    with pytest.raises(recdsl.RecError, match=r"input x has shape \[1, 3, 3, 3\], expected \[B, X, Y, 2\]"):
        layer(x=torch.randn(1, 3, 3, 3))
    seq = recdsl.load("lstm")(D=2, H=2, backend=backend)
    with pytest.raises(recdsl.RecError, match="flip= is for cells that run `over grid2d`") as info:
        seq(x=torch.randn(1, 3, 2), flip=(True, False))
    assert "reverse=True" in info.value.hint


def test_flip_under_torch_compile():
    """A grid runs eagerly under torch.compile (a graph break): flip= reaches it."""
    layer = recdsl.load(MDRNN)(D=2, H=2, backend="torch").double()
    x = torch.randn(1, 3, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(16))
    torch._dynamo.reset()
    got = torch.compile(lambda x: layer(x=x, flip=(True, False))[0], backend="aot_eager")(x)
    torch._dynamo.reset()
    assert torch.equal(got, layer(x=x, flip=(True, False))[0])
    assert not torch.allclose(got, layer(x=x)[0])
