"""stdlib/block (block transitions: input-dependent block-diagonal ones, and LSSL's dense one,
a single N x N block): load + classes, reference vs torch, and the papers' equations written
here with explicit block matrices."""
from __future__ import annotations

import math

import pytest
import torch

from recdsl import plan as PL

from .common import B, T, ORACLE, P, check_backends, check_loads, close, family_cells, rn, run_both

EXPECTED = {
    "block_diag_lrnn": {"h1": PL.BLOCK_DIAGONAL, "h2": PL.BLOCK_DIAGONAL},
    "plstm1d": {"C0": PL.BLOCK_DIAGONAL, "C1": PL.BLOCK_DIAGONAL},
    "lssl": {"x": PL.DENSE},                  # one dense N x N block, hoisted (solve of params)
}


def test_family_is_complete():
    assert set(family_cells("block")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_and_classes(name):
    plan = check_loads(name, EXPECTED[name])
    assert len(plan.stages) == 1 and (plan.stages[0].block == 2 or plan.stages[0].cls == PL.DENSE)
    assert plan.outputs[0].kind == "linear readout"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree(name):
    check_backends(name)


def _cmp(name, layers, xs, want, states, tol=1e-10):
    for layer in layers:
        out, st = layer(**xs)
        close(out, want, tol, f"{name} output ({layer.backend_name})", name)
        for k, v in states.items():
            close(st[k], v, tol, f"{name} {k} ({layer.backend_name})", name)


def test_block_diag_lrnn_matches_the_papers_equations():
    """Fan et al. 2023, Sec. 4: x_k = A(u_k) x_{k-1} + B u_k, A block-diagonal, each block's
    columns divided by max(1, ||column||_p); written here as [NB, 2, 2] matrices."""
    ORACLE["block_diag_lrnn"] = "Fan et al. (2023) equations, [NB, 2, 2] block matmuls"
    D, NB, p = 3, 4, 1.2
    layers = run_both("block_diag_lrnn", D=D, NB=NB)
    L = layers[0]
    x = rn(B, T, D, seed=1, scale=1.5)
    Wb = torch.stack([torch.stack([P(L, "W11"), P(L, "W12")], 1), torch.stack([P(L, "W21"), P(L, "W22")], 1)], 1)
    Bm = torch.stack([P(L, "B1"), P(L, "B2")], 1)                       # [NB, 2, D]
    Cm = torch.stack([P(L, "C1"), P(L, "C2")], -1)                      # [D, NB, 2]
    h = torch.zeros(B, NB, 2, dtype=torch.float64)
    ys = []
    for t in range(T):
        A = torch.einsum("nijd,bd->bnij", Wb, x[:, t])                   # [B, NB, 2, 2]
        cn = torch.linalg.vector_norm(A, ord=p, dim=2, keepdim=True).clamp(min=1.0)   # column norms
        h = torch.einsum("bnij,bnj->bni", A / cn, h) + torch.einsum("nid,bd->bni", Bm, x[:, t])
        ys.append(torch.einsum("dni,bni->bd", Cm, h))
    assert (torch.linalg.vector_norm(A, ord=p, dim=2) > 1).any()       # the normalisation is exercised
    _cmp("block_diag_lrnn", layers, {"x": x}, torch.stack(ys, 1), {"h1": h[..., 0], "h2": h[..., 1]})


def test_plstm1d_matches_the_papers_equations():
    """Poeppel et al. 2025, pLSTM on a line graph: C_t = T_t C_{t-1} + S_t k_t v_t^T over the
    J = 2 edge-state axis, y_t = q_t (M_t C_{t-1}) + D_t (q_t . k_t) v_t; written here with a
    [J, K, V] tensor and a [J, J] transition."""
    ORACLE["plstm1d"] = "Poeppel et al. (2025) equations, [J, J] transition loop"
    K, V = 3, 4
    layers = run_both("plstm1d", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    sc = {n: rn(B, T, seed=10 + i, scale=0.6) for i, n in enumerate(
        ("s0", "s1", "t00", "t01", "t10", "t11", "m0", "m1", "d"))}
    Tm = torch.stack([torch.stack([sc["t00"], sc["t01"]], -1), torch.stack([sc["t10"], sc["t11"]], -1)], -2)
    Sv, Mv = torch.stack([sc["s0"], sc["s1"]], -1), torch.stack([sc["m0"], sc["m1"]], -1)
    C = torch.zeros(B, 2, K, V, dtype=torch.float64)
    ys = []
    for t in range(T):
        kv = k[:, t, :, None] * v[:, t, None, :]
        ys.append(torch.einsum("bk,bj,bjkv->bv", q[:, t], Mv[:, t], C)
                  + sc["d"][:, t, None] * (q[:, t] * k[:, t]).sum(-1, keepdim=True) * v[:, t])
        C = torch.einsum("bij,bjkv->bikv", Tm[:, t], C) + Sv[:, t, :, None, None] * kv[:, None]
    _cmp("plstm1d", layers, dict(q=q, k=k, v=v, **sc), torch.stack(ys, 1), {"C0": C[:, 0], "C1": C[:, 1]})


def test_lssl_matches_the_papers_equations():
    """Gu et al. 2021, Sec. 2-4: per feature an SSM x' = A x + B u, y = C x + D u, A starting at
    HiPPO-LegS (A_nk = -sqrt(2n+1) sqrt(2k+1) below the diagonal, -(n+1) on it), discretised
    by the bilinear transform A_bar = (I - dt/2 A)^-1 (I + dt/2 A), B_bar = (I - dt/2 A)^-1 dt B;
    written here with explicit inverses, per feature (the cell's heads)."""
    ORACLE["lssl"] = "bilinear-discretised SSM loop (Gu et al. 2021)"
    N, H = 4, 3
    layers = run_both("lssl", N=N, H=H)
    with torch.no_grad():
        for layer in layers:
            layer.A_delta.copy_(rn(H, N, N, seed=4, scale=0.1))    # trained away from HiPPO
            layer.log_dt.copy_(rn(H, seed=5, scale=0.3) - 1.0)     # larger steps: an informative test
    L = layers[0]
    hippo = torch.zeros(N, N, dtype=torch.float64)
    for n in range(N):
        for k in range(N):
            hippo[n, k] = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else -(n + 1) if n == k else 0.0
    A = hippo + P(L, "A_delta")                                                        # [H, N, N]
    dt = torch.exp(P(L, "log_dt"))[:, None, None]
    eye = torch.eye(N, dtype=torch.float64)
    left = torch.linalg.inv(eye - dt / 2 * A)
    A_bar = left @ (eye + dt / 2 * A)
    B_bar = (left @ (dt * P(L, "B")[..., None]))[..., 0]                               # [H, N]
    u = rn(B, T, H, seed=1)
    x = torch.zeros(B, H, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        x = torch.einsum("hnk,bhk->bhn", A_bar, x) + B_bar * u[:, t, :, None]
        ys.append((P(L, "C") * x).sum(-1) + P(L, "D") * u[:, t])
    _cmp("lssl", layers, {"u": u}, torch.stack(ys, 1), {"x": x})
