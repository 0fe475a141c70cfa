"""Grids and DAGs on the reference backend (LANGUAGE.md §6) against the equations written
out here: pLSTM on a 2-D grid (P-mode) and on a DAG, and the child-sum Tree-LSTM."""
import pytest
import torch

import recdsl
from recdsl.graph import line_pairs
from helpers import language_examples

DT = torch.float64
EX = language_examples()


def test_plstm_2d_matches_the_grid_equations():
    torch.manual_seed(0)
    spec = recdsl.load(EX["PLSTM2D"])
    layer = spec(K=3, V=2)
    B, X, Y, K, V = 2, 3, 4, 3, 2
    q, k, v = torch.randn(B, X, Y, K, dtype=DT), torch.randn(B, X, Y, K, dtype=DT), torch.randn(B, X, Y, V, dtype=DT)
    sc = {n: torch.rand(B, X, Y, dtype=DT) for n in ("s_r", "s_d", "t_rl", "t_ru", "t_dl", "t_du", "m_l", "m_u", "d")}
    y, st = layer(q=q, k=k, v=v, **sc)
    assert y.shape == (B, X, Y, V) and st["Cr"].shape == (B, X, Y, K, V)
    zero = torch.zeros(B, K, V, dtype=DT)
    Cr, Cd = {}, {}
    for x in range(X):
        for yy in range(Y):
            left = Cr.get((x - 1, yy), zero)
            up = Cd.get((x, yy - 1), zero)
            kv = k[:, x, yy, :, None] * v[:, x, yy, None, :]
            g = lambda n: sc[n][:, x, yy, None, None]  # noqa: E731
            Cr[(x, yy)] = g("t_rl") * left + g("t_ru") * up + g("s_r") * kv
            Cd[(x, yy)] = g("t_du") * up + g("t_dl") * left + g("s_d") * kv
            qq = q[:, x, yy]
            expect = (qq[:, None, :] @ (g("m_l") * left + g("m_u") * up))[:, 0] \
                + sc["d"][:, x, yy, None] * (qq * k[:, x, yy]).sum(-1, keepdim=True) * v[:, x, yy]
            assert torch.allclose(y[:, x, yy], expect, atol=1e-12)
            assert torch.allclose(st["Cr"][:, x, yy], Cr[(x, yy)], atol=1e-12)


def _random_dag(N, seed):
    g = torch.Generator().manual_seed(seed)
    edges = [(u, v) for v in range(N) for u in range(v) if torch.rand(1, generator=g) < 0.5]
    return edges


def test_plstm_graph_matches_the_dag_equations():
    torch.manual_seed(1)
    spec = recdsl.load(EX["PLSTMGraph"])
    layer = spec(K=2, V=3)
    N, B, K, V = 6, 2, 2, 3
    edges = _random_dag(N, 3)
    E = len(edges)
    q, k, v, d = (torch.randn(B, N, K, dtype=DT), torch.randn(B, N, K, dtype=DT), torch.randn(B, N, V, dtype=DT),
                  torch.rand(B, N, dtype=DT))
    s, m = torch.rand(B, E, dtype=DT), torch.rand(B, E, dtype=DT)
    pair = {(a, o): p for p, (a, o) in enumerate(line_pairs(edges).tolist())}   # (in-edge, out-edge) -> index
    t = torch.rand(B, len(pair), dtype=DT)
    y, st = layer(q=q, k=k, v=v, d=d, s=s, m=m, t=t, edges=edges)
    C = {}
    for node in range(N):  # nodes are numbered in a topological order here
        ins = [e for e, (a, b) in enumerate(edges) if b == node]
        outs = [e for e, (a, b) in enumerate(edges) if a == node]
        kv = k[:, node, :, None] * v[:, node, None, :]
        for o in outs:
            acc = sum((t[:, pair[(e, o)], None, None] * C[e] for e in ins), torch.zeros(B, K, V, dtype=DT))
            C[o] = acc + s[:, o, None, None] * kv
        read = sum((m[:, e, None, None] * C[e] for e in ins), torch.zeros(B, K, V, dtype=DT))
        expect = (q[:, node, None, :] @ read)[:, 0] + d[:, node, None] * (q[:, node] * k[:, node]).sum(-1, True) * v[:, node]
        assert torch.allclose(y[:, node], expect, atol=1e-12)
    for e in range(E):
        assert torch.allclose(st["C"][:, e], C[e], atol=1e-12)


def test_child_sum_tree_lstm():
    torch.manual_seed(2)
    spec = recdsl.load(EX["TreeLSTM"])
    D, H, B = 3, 4, 2
    layer = spec(D=D, H=H).double()
    edges = [(1, 0), (2, 0), (3, 1), (4, 1)]  # children -> parent: leaves first in topological order
    x = torch.randn(B, 5, D, dtype=DT)
    h_out, st = layer(x=x, edges=edges)
    W, U, Uf, b = layer.W.detach(), layer.U.detach(), layer.Uf.detach(), layer.b.detach()
    h, c = {}, {}
    for node in (4, 3, 2, 1, 0):
        kids = [a for a, p in edges if p == node]
        wi, wo, wu, wf = (W @ x[:, node].T).T.add(b).split(H, -1)
        hs = sum((h[j] for j in kids), torch.zeros(B, H, dtype=DT))
        ui, uo, uu = (hs @ U.T).split(H, -1)
        i, o, u = torch.sigmoid(wi + ui), torch.sigmoid(wo + uo), torch.tanh(wu + uu)
        c[node] = i * u + sum((torch.sigmoid(wf + h[j] @ Uf.T) * c[j] for j in kids), torch.zeros(B, H, dtype=DT))
        h[node] = o * torch.tanh(c[node])
        assert torch.allclose(h_out[:, node], h[node], atol=1e-12)
        assert torch.allclose(st["c"][:, node], c[node], atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dag_errors(backend):
    layer = recdsl.load(EX["TreeLSTM"])(D=2, H=2, backend=backend)
    x = torch.randn(1, 3, 2)
    with pytest.raises(recdsl.RecError, match="give its edges"):
        layer(x=x)
    with pytest.raises(recdsl.RecError, match="cycle"):
        layer(x=x, edges=[(0, 1), (1, 2), (2, 0)])
    with pytest.raises(recdsl.RecError, match="not between two distinct nodes"):
        layer(x=x, edges=[(0, 5)])
