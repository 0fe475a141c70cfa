"""The grid cells of stdlib/dag/ against oracles written here from the papers' equations
(plain float64 raster loops over the grid, x first, then y; not generated code): the 2-D
LSTM (Graves, Fernández & Schmidhuber, 2007) and pLSTM 2-D in D-mode (Pöppel et al., 2025).
Every backend (reference; torch, one generated C loop on CPU; triton, its wavefront kernel)
on 8x8 and 13x7 grids: outputs, the states of every cell, and the gradients of a random
projection of them with respect to every input and param (autograd through the oracle)."""
import pytest
import torch

import recdsl

DT = torch.float64
B = 2
GRIDS = [(8, 8), (13, 7)]
BACKENDS = ["reference", "torch", "triton"]


def mdlstm_oracle(x, W, Ul, Uu, b):
    """Graves et al. (2007), eqs. for the 2-D LSTM without peepholes: for cell (i, j) with
    predecessors (i-1, j) (left) and (i, j-1) (up), off the grid zero:
        z = W x + U_l h_left + U_u h_up + b,  gates in the order i, f_left, f_up, g, o
        c = f_left * c_left + f_up * c_up + i * g,  h = o * tanh(c)."""
    Bn, X, Y, _ = x.shape
    H = Ul.shape[1]
    zero = x.new_zeros(Bn, H)
    h, c = {}, {}
    for i in range(X):
        for j in range(Y):
            hl, cl = h.get((i - 1, j), zero), c.get((i - 1, j), zero)
            hu, cu = h.get((i, j - 1), zero), c.get((i, j - 1), zero)
            z = x[:, i, j] @ W.T + hl @ Ul.T + hu @ Uu.T + b
            zi, zfl, zfu, zg, zo = z.split(H, -1)
            c[i, j] = torch.sigmoid(zfl) * cl + torch.sigmoid(zfu) * cu + torch.sigmoid(zi) * torch.tanh(zg)
            h[i, j] = torch.sigmoid(zo) * torch.tanh(c[i, j])
    grid = lambda d: torch.stack([torch.stack([d[i, j] for j in range(Y)], 1) for i in range(X)], 1)  # noqa: E731
    return grid(h), {"h": grid(h), "c": grid(c)}


def plstm_d_oracle(q, k, v, s_r, s_d, a_rl, a_ru, a_du, m_l, m_u, d):
    """Pöppel et al. (2025), pLSTM 2-D, D-mode with chirality L (no down-from-left
    transition), transitions T = tanh(a):
        C_r[i, j] = T_rl C_r[i-1, j] + T_ru C_d[i, j-1] + S_r k v^T
        C_d[i, j] = T_du C_d[i, j-1] + S_d k v^T
        y[i, j]   = q^T (M_l C_r[i-1, j] + M_u C_d[i, j-1]) + D (q . k) v."""
    Bn, X, Y, K = q.shape
    V = v.shape[-1]
    zero = q.new_zeros(Bn, K, V)
    Cr, Cd, y = {}, {}, {}
    for i in range(X):
        for j in range(Y):
            left, up = Cr.get((i - 1, j), zero), Cd.get((i, j - 1), zero)
            s = lambda t: t[:, i, j, None, None]  # noqa: E731
            kv = k[:, i, j, :, None] * v[:, i, j, None, :]
            Cr[i, j] = torch.tanh(s(a_rl)) * left + torch.tanh(s(a_ru)) * up + s(s_r) * kv
            Cd[i, j] = torch.tanh(s(a_du)) * up + s(s_d) * kv
            qq = q[:, i, j]
            y[i, j] = torch.einsum("bk,bkv->bv", qq, s(m_l) * left + s(m_u) * up) \
                + d[:, i, j, None] * (qq * k[:, i, j]).sum(-1, keepdim=True) * v[:, i, j]
    grid = lambda dd: torch.stack([torch.stack([dd[i, j] for j in range(Y)], 1) for i in range(X)], 1)  # noqa: E731
    return grid(y), {"Cr": grid(Cr), "Cd": grid(Cd)}


def _check(layer, oracle, inputs, params):
    """Forward both; then the gradient of one random projection of output and states with
    respect to the inputs and params, by autograd through each."""
    xs1 = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    xs2 = {n: x.clone().requires_grad_(True) for n, x in inputs.items()}
    ps = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    y1, st1 = layer(**xs1)
    y2, st2 = oracle(**xs2, **ps)
    assert y1.shape == y2.shape and torch.allclose(y1, y2, rtol=1e-10, atol=1e-12), (y1 - y2).abs().max()
    for s in st2:
        assert torch.allclose(st1[s], st2[s], rtol=1e-10, atol=1e-12), (s, (st1[s] - st2[s]).abs().max())
    g = torch.Generator().manual_seed(11)
    proj = [torch.randn(t.shape, generator=g, dtype=DT) for t in [y2] + [st2[s] for s in sorted(st2)]]
    loss1 = sum((t * r).sum() for t, r in zip([y1] + [st1[s] for s in sorted(st2)], proj))
    loss2 = sum((t * r).sum() for t, r in zip([y2] + [st2[s] for s in sorted(st2)], proj))
    own = dict(layer.named_parameters())
    g1 = torch.autograd.grad(loss1, list(xs1.values()) + [own[n] for n in params])
    g2 = torch.autograd.grad(loss2, list(xs2.values()) + list(ps.values()))
    for name, a, b in zip(list(inputs) + list(params), g1, g2):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), (name, (a - b).abs().max())


def _ran(layer, backend):
    if backend != "reference":
        # what the plan selected ran: on torch the C raster loop (grid_loop.py), on triton the
        # generated wavefront kernel (backends/triton/grid_kernels.py)
        want = {"torch": "torch.c_grid", "triton": "triton.wavefront"}[backend]
        assert {c.kernel.name for c in layer.plan.selections[backend].stages} == {want}
        assert set(layer.ran) == {want}, layer.ran


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("X, Y", GRIDS)
def test_mdlstm2d_matches_graves_equations(backend, X, Y):
    torch.manual_seed(X * Y)
    D, H = 3, 4
    layer = recdsl.load("mdlstm2d")(D=D, H=H, backend=backend).double()
    with torch.no_grad():   # a non-zero bias: every gate's offset is exercised
        layer.b.copy_(0.3 * torch.randn(5 * H, dtype=DT))
    params = {n: p.detach() for n, p in layer.named_parameters()}
    assert set(params) == {"W", "Ul", "Uu", "b"}
    _check(layer, mdlstm_oracle, {"x": torch.randn(B, X, Y, D, dtype=DT)}, params)
    _ran(layer, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("X, Y", GRIDS)
def test_plstm2d_dmode_matches_the_equations(backend, X, Y):
    torch.manual_seed(X + 31 * Y)
    K, V = 3, 2
    layer = recdsl.load("plstm2d_dmode")(K=K, V=V, backend=backend).double()
    xs = {"q": torch.randn(B, X, Y, K, dtype=DT), "k": torch.randn(B, X, Y, K, dtype=DT),
          "v": torch.randn(B, X, Y, V, dtype=DT)}
    xs.update({n: torch.rand(B, X, Y, dtype=DT) for n in ("s_r", "s_d", "m_l", "m_u", "d")})
    xs.update({n: 2 * torch.randn(B, X, Y, dtype=DT) for n in ("a_rl", "a_ru", "a_du")})
    _check(layer, plstm_d_oracle, xs, {})
    _ran(layer, backend)


def test_the_new_grid_cells_classify_as_stated():
    plan = recdsl.load("mdlstm2d").plan()
    assert plan.over == "grid2d" and plan.classes() == {"h": "nonlinear", "c": "nonlinear"}
    assert plan.stability.mode is None and len(plan.warnings) == 1
    plan = recdsl.load("plstm2d_dmode").plan()
    assert plan.classes() == {"Cr": "linear over a DAG", "Cd": "linear over a DAG"}
    assert plan.stability.mode == "D" and plan.warnings == []
    assert all(sel.cannot is None for sel in plan.selections.values())
