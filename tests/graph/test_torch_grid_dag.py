"""Grids and DAGs on the torch backend (torch.wavefront, torch.level_sync) against the
reference in float64: outputs, final states, gradients of inputs and params. A grid runs
as one generated C raster loop on CPU (grid_loop.py, layer.ran says torch.c_grid) and by
anti-diagonals in torch otherwise (forced here by taking the C loop away): both are
compared."""
import pytest
import torch

import recdsl
from recdsl.graph import line_pairs
from recdsl.lowering import LevelSync, Wavefront
from helpers import language_examples

DT = torch.float64
EX = language_examples()

MDRNN = """cell MDLSTM2D(D, H):
    over grid2d
    input x[D]
    param W[5*H, D] ~ normal(0, 1/sqrt(D))
    param Ul[5*H, H] ~ normal(0, 1/sqrt(H))
    param Uu[5*H, H] ~ normal(0, 1/sqrt(H))
    param b[5*H] = 0
    state h[H] = 0
    state c[H] = 0
    i, fl, fu, o, g = split(W @ x + Ul @ h.left + Uu @ h.up + b, 5)
    c' = sigmoid(i) * tanh(g) + sigmoid(fl) * c.left + sigmoid(fu) * c.up
    h' = sigmoid(o) * tanh(c')
    output y = tanh(h' + 0.5 * h.left * h.up)
"""


def _pair(spec, **dims):
    ref = spec(backend="reference", **dims).double()
    fast = spec(backend="torch", **dims).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _compare(ref, fast, inputs: dict, **kw):
    """Forward both, then the gradient of one random projection of everything returned."""
    res = []
    for layer in (ref, fast):
        xs = {n: x.detach().clone().requires_grad_(True) for n, x in inputs.items()}
        y, st = layer(**xs, **kw)
        ys = (y,) if isinstance(y, torch.Tensor) else tuple(y)
        # the reference gives no tensor for an edge state of a graph without edges; torch [B, 0, ...]
        vals = [v for v in list(ys) + [st[s] for s in sorted(st)] if v is not None and v.numel()]
        g = torch.Generator().manual_seed(7)
        loss = sum((v * torch.randn(v.shape, generator=g, dtype=DT)).sum() for v in vals)
        params = [p for _, p in sorted(layer.named_parameters())]
        grads = torch.autograd.grad(loss, list(xs.values()) + params, allow_unused=True)
        res.append((vals, grads))
    (v1, g1), (v2, g2) = res
    assert len(v1) == len(v2)
    for a, b in zip(v1, v2):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-11), (a - b).abs().max()
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert all(g is None or not (g != 0).any() for g in (a, b))
            continue
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-11), (a - b).abs().max()


GRID_PATHS = {"c": "torch.c_grid", "wavefront": "torch.wavefront"}


def _grid_path(layer, path):
    """Run the grid on `path`: the C loop (the default on CPU) or the torch wavefront."""
    if path == "wavefront":
        layer._program.grid_loop = None
    else:
        assert layer._program.grid_loop is not None, layer._program.grid_loop_why
    return GRID_PATHS[path]


def _kernels(layer, backend="torch"):
    return [type(c.form) for c in layer.plan.selections[backend].stages], layer.ran


@pytest.mark.parametrize("path", list(GRID_PATHS))
@pytest.mark.parametrize("X, Y", [(8, 8), (13, 7), (1, 5), (4, 1)])
def test_plstm2d_wavefront_matches_the_reference(X, Y, path):
    torch.manual_seed(0)
    ref, fast = _pair(recdsl.load(EX["PLSTM2D"]), K=3, V=2)
    kernel = _grid_path(fast, path)
    B = 2
    xs = {"q": torch.randn(B, X, Y, 3, dtype=DT), "k": torch.randn(B, X, Y, 3, dtype=DT),
          "v": torch.randn(B, X, Y, 2, dtype=DT)}
    xs.update({n: torch.rand(B, X, Y, dtype=DT) for n in ("s_r", "s_d", "t_rl", "t_ru", "t_dl", "t_du", "m_l",
                                                           "m_u", "d")})
    _compare(ref, fast, xs)
    forms, ran = _kernels(fast)
    assert set(forms) == {Wavefront} and set(ran) == {kernel}


@pytest.mark.parametrize("path", list(GRID_PATHS))
@pytest.mark.parametrize("X, Y", [(8, 8), (13, 7)])
def test_unseen_nonlinear_2d_lstm_wavefront(X, Y, path):
    torch.manual_seed(1)
    ref, fast = _pair(recdsl.load(MDRNN), D=3, H=4)
    kernel = _grid_path(fast, path)
    _compare(ref, fast, {"x": torch.randn(2, X, Y, 3, dtype=DT)})
    forms, ran = _kernels(fast)
    assert set(forms) == {Wavefront} and set(ran) == {kernel}
    assert "torch.c_grid" in fast.plan.selections["torch"].stages[0].summary()   # what runs on CPU


def _random_dag(N, seed, p=0.4):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)   # node numbers not in topological order
    return [(int(perm[u]), int(perm[v])) for v in range(N) for u in range(v) if torch.rand(1, generator=g) < p]


def _random_tree(N, seed):
    """children -> parent, node numbers shuffled."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    return [(int(perm[c]), int(perm[int(torch.randint(0, c, (1,), generator=g))])) for c in range(1, N)]


GRAPHS = {
    "random dag": lambda: _random_dag(9, 3),
    "dense dag": lambda: _random_dag(7, 4, p=0.8),
    "tree": lambda: _random_tree(11, 5),
    "path": lambda: [(i + 1, i) for i in range(9)],
    "no edges": lambda: [],
}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_tree_lstm_level_sync_matches_the_reference(graph):
    torch.manual_seed(2)
    edges = GRAPHS[graph]()
    N = 1 + max([max(e) for e in edges], default=4)
    ref, fast = _pair(recdsl.load(EX["TreeLSTM"]), D=3, H=4)
    edges = torch.tensor(edges, dtype=torch.long).reshape(-1, 2)   # [0, 2] without edges
    _compare(ref, fast, {"x": torch.randn(2, N, 3, dtype=DT)}, edges=edges)
    forms, ran = _kernels(fast)
    assert set(forms) == {LevelSync} and set(ran) == {"torch.level_sync"}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_plstm_graph_level_sync_matches_the_reference(graph):
    torch.manual_seed(3)
    edges = GRAPHS[graph]()
    N, B, K, V = 1 + max([max(e) for e in edges], default=4), 2, 2, 3
    E = len(edges)
    ref, fast = _pair(recdsl.load(EX["PLSTMGraph"]), K=K, V=V)
    xs = {"q": torch.randn(B, N, K, dtype=DT), "k": torch.randn(B, N, K, dtype=DT), "v": torch.randn(B, N, V, dtype=DT),
          "d": torch.rand(B, N, dtype=DT), "s": torch.rand(B, E, dtype=DT), "m": torch.rand(B, E, dtype=DT),
          "t": torch.rand(B, len(line_pairs(edges)), dtype=DT)}   # one per (in-edge, out-edge) pair
    _compare(ref, fast, xs, edges=torch.tensor(edges, dtype=torch.long).reshape(-1, 2))
    forms, ran = _kernels(fast)
    assert set(forms) == {LevelSync} and set(ran) == {"torch.level_sync"}


def test_triton_borrows_the_graph_kernels():
    """A grid runs triton's generated wavefront kernel (tests/triton/test_grid_kernels.py),
    torch.wavefront kept as the fallback for a step it refuses; a DAG borrows torch.level_sync."""
    from recdsl.backends.triton.kernels import REGISTRY
    names = {k.name: k for k in REGISTRY.kernels}
    assert names["torch.wavefront"].borrowed == "torch" and names["torch.level_sync"].borrowed == "torch"
    torch.manual_seed(4)
    spec = recdsl.load(MDRNN)
    ref, tri = spec(backend="reference", D=2, H=3).double(), spec(backend="triton", D=2, H=3).double()
    tri.load_state_dict(ref.state_dict())
    _compare(ref, tri, {"x": torch.randn(2, 5, 4, 2, dtype=DT)})
    assert set(tri.ran) == {"triton.wavefront"}
    assert "fallback: torch code" not in tri.plan.selections["triton"].stages[0].summary()
    spec = recdsl.load(EX["TreeLSTM"])
    ref, tri = spec(backend="reference", D=2, H=3).double(), spec(backend="triton", D=2, H=3).double()
    tri.load_state_dict(ref.state_dict())
    _compare(ref, tri, {"x": torch.randn(2, 6, 2, dtype=DT)}, edges=torch.tensor(_random_tree(6, 9)))
    assert set(tri.ran) == {"torch.level_sync"}


def test_grid_output_blocks_recycled_only_when_unreferenced(monkeypatch):
    """grid_loop recycles its large output blocks (page faults on fresh memory cost more than
    the loop): a block is reused only once nothing references it -- not while the caller
    holds the outputs, nor while autograd holds the states it saved for the backward."""
    from recdsl.backends.torch import grid_loop
    monkeypatch.setattr(grid_loop, "POOL_FROM", 0)      # every block through the pool
    monkeypatch.setattr(grid_loop, "_POOL", {})
    torch.manual_seed(5)
    ref, fast = _pair(recdsl.load(EX["PLSTM2D"]), K=3, V=2)
    assert fast._program.grid_loop is not None, fast._program.grid_loop_why

    def inputs():
        xs = {n: torch.randn(2, 6, 5, 3 if n in "qk" else 2, dtype=DT) for n in ("q", "k", "v")}
        xs.update({n: torch.rand(2, 6, 5, dtype=DT) for n in ("s_r", "s_d", "t_rl", "t_ru", "t_dl", "t_du", "m_l",
                                                            "m_u", "d")})
        return xs
    a, b = inputs(), inputs()
    y1, st1 = fast(**a)
    kept = st1["Cr"].clone()
    y2, st2 = fast(**b)                                  # st1 still held: fresh blocks
    assert torch.equal(st1["Cr"], kept) and st2["Cr"].data_ptr() != st1["Cr"].data_ptr()
    freed = st1["Cr"].data_ptr()
    del y1, st1
    y3, st3 = fast(**b)                                  # st1's blocks are free again: reused
    assert st3["Cr"].data_ptr() == freed or st3["Cd"].data_ptr() == freed
    assert torch.equal(st3["Cr"], st2["Cr"]) and torch.equal(y3, y2)
    # autograd's saved states are references too: a forward between forward and backward
    xs = {n: x.clone().requires_grad_(True) for n, x in a.items()}
    y, st = fast(**xs)
    loss = (y * y).sum() + st["Cd"].sum()
    del y, st
    fast(**b)
    fast(**b)
    got = torch.autograd.grad(loss, list(xs.values()))
    xr = {n: x.clone().requires_grad_(True) for n, x in a.items()}
    yr, str_ = ref(**xr)
    want = torch.autograd.grad((yr * yr).sum() + str_["Cd"].sum(), list(xr.values()))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-11)


ODD_GRIDS = {
    # a state read only from the left, one that is a plain input, an output that reads no state
    "left only": """cell G1(D, H):
    over grid2d
    input x[D]
    param W[H, D] ~ normal(0, 1/sqrt(D))
    param a[H] = 0.5
    state h[H] = 0
    state c[D] = 0
    h' = tanh(W @ x + sigmoid(a) * h.left)
    c' = x
    output y = h' * 2.0
    output z = x * 3.0
""",
    # a matrix and a vector state read across (M.left, u.left, u.up), an outer product, softmax
    "mixed": """cell G2(D):
    over grid2d
    input x[D], g[]
    state M[D, D] = 0
    state u[D] = 0
    M' = sigmoid(g) * M.up + outer(x, u.left) * 0.1
    u' = softmax(x + M.left @ x)
    output y = M' @ x + u.up
""",
}


@pytest.mark.parametrize("path", list(GRID_PATHS))
@pytest.mark.parametrize("cell", list(ODD_GRIDS))
def test_unseen_grid_cells_both_paths(cell, path):
    torch.manual_seed(6)
    spec = recdsl.load(ODD_GRIDS[cell])
    ref, fast = _pair(spec, **spec.analysis_dims())
    kernel = _grid_path(fast, path)
    xs = {n: torch.randn((2, 5, 4) + fast.ir.concrete(v.shape), dtype=DT) * 0.5 for n, v in spec.cell.inputs.items()}
    _compare(ref, fast, xs)
    assert set(fast.ran) == {kernel}
