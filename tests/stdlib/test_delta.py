"""stdlib/delta (delta rule, low rank, online learners): load + classes, reference vs torch,
and an oracle per cell: fla-core's naive kernels (DeltaNet, Gated DeltaNet, DeltaProduct,
KDA, RWKV-7 through the DPLR recurrence, TTT-Linear), or the paper's equations written here
(Titans, Longhorn)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recdsl.lowering import ChunkDelta, ChunkDPLR, HouseholderProducts
import recdsl
from recdsl import plan as PL

from .common import B, T, ORACLE, P, check_backends, check_loads, close, family_cells, fla_naive, rn, run_both

EXPECTED = {
    "deltanet": {"S": PL.LOW_RANK},
    "gated_deltanet": {"S": PL.LOW_RANK},
    "deltaproduct": {"S": PL.LOW_RANK},
    "kda": {"S": PL.LOW_RANK},
    "rwkv7": {"S": PL.LOW_RANK},
    "ttt_linear": {"W": PL.NONLINEAR, "Wb": PL.NONLINEAR},   # the inner LayerNorm makes the update nonlinear in W
    "titans": {"M": PL.DENSE, "Sm": PL.DENSE},               # (M, momentum) jointly affine, coupled: a dense transition
    "longhorn": {"S": PL.DIAGONAL},                          # the paper's elementwise form of its update
    "yaad": {"M": PL.NONLINEAR},                             # the Huber switch (norm test, sign) on M's readout
}
LOW_RANK = {"deltanet": (1, "identity"), "gated_deltanet": (1, "scalar"), "deltaproduct": (2, "identity"),
            "kda": (1, "vector"), "rwkv7": (1, "vector")}


def test_family_is_complete():
    assert set(family_cells("delta")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_and_classes(name):
    plan = check_loads(name, EXPECTED[name])
    s = plan.stages[0]
    if name in LOW_RANK:
        assert (s.rank, s.decay) == LOW_RANK[name]
        assert isinstance(plan.form(s.index), (ChunkDelta, HouseholderProducts, ChunkDPLR))
        assert plan.outputs[0].kind == "linear readout"
    if name == "longhorn":
        assert s.decay == "elementwise" and plan.outputs[0].kind == "linear readout"
    if name == "ttt_linear":
        assert s.jacobian == "dense"
    if name == "titans":
        assert s.states == ["M", "Sm"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree(name):
    check_backends(name)


# ---------------------------------------------------------------------------- oracles

def l2n(x):
    """The language's l2norm (docs/LANGUAGE.md): x * rsqrt(sum(x*x) + 1e-6)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _cmp(name, layers, xs, want, states, tol):
    for layer in layers:
        out, st = layer(**xs)
        close(out, want, tol, f"{name} output ({layer.backend_name})", name)
        for k, v in states.items():
            close(st[k], v, tol, f"{name} {k} ({layer.backend_name})", name)


def test_deltanet_matches_fla_delta_rule_recurrence():
    ORACLE["deltanet"] = "fla delta_rule_recurrence (fp32)"
    naive = fla_naive("delta_rule.naive", "delta_rule_recurrence")
    K, V = 3, 4
    layers = run_both("deltanet", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), F.normalize(rn(B, T, K, seed=2), dim=-1), rn(B, T, V, seed=3)
    beta = torch.sigmoid(rn(B, T, seed=4))
    S0 = rn(B, K, V, seed=5)
    h = lambda a: a[:, None]  # noqa: E731   one head, fla layout [B, H, T, ...]; fla scales q by K**-0.5
    o, S = naive(h(q) * K ** 0.5, h(k), h(v), h(beta), initial_state=S0[:, None].float())
    _cmp("deltanet", layers, dict(q=q, k=k, v=v, beta=beta, state={"S": S0}), o[:, 0], {"S": S[:, 0]}, 1e-5)


def test_gated_deltanet_matches_fla_naive_recurrent_gated_delta_rule():
    ORACLE["gated_deltanet"] = "fla naive_recurrent_gated_delta_rule (fp32)"
    naive = fla_naive("gated_delta_rule.naive", "naive_recurrent_gated_delta_rule")
    K, V = 3, 4
    layers = run_both("gated_deltanet", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    beta, g = torch.sigmoid(rn(B, T, seed=4)), F.logsigmoid(rn(B, T, seed=5) + 2)
    h = lambda a: a[:, :, None]  # noqa: E731   [B, T, H, ...]
    o, S = naive(h(l2n(q)), h(l2n(k)), h(v), h(beta), h(g), output_final_state=True)
    _cmp("gated_deltanet", layers, dict(q=q, k=k, v=v, beta=beta, g=g), o[:, :, 0], {"S": S[:, 0]}, 1e-5)


def test_deltaproduct_matches_fla_naive_gated_delta_product():
    ORACLE["deltaproduct"] = "fla naive_recurrent_gated_delta_product (fp32)"
    naive = fla_naive("gated_delta_product.naive", "naive_recurrent_gated_delta_product")
    K, V, NH = 3, 4, 2
    layers = run_both("deltaproduct", K=K, V=V, NH=NH)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, NH, K, seed=2), rn(B, T, NH, V, seed=3)
    beta = torch.sigmoid(rn(B, T, NH, seed=4)) * 2      # DeltaProduct allows beta in (0, 2)
    fl = lambda a: a.reshape(B, T * NH, 1, *a.shape[3:])  # noqa: E731   householder steps interleaved in time
    o, S = naive(q[:, :, None], fl(l2n(k)), fl(v), None, beta.reshape(B, T * NH, 1), 1.0,
                 output_final_state=True, num_householder=NH)
    _cmp("deltaproduct", layers, dict(q=q, k=k, v=v, beta=beta), o[:, :, 0], {"S": S[:, 0]}, 1e-5)


def test_kda_matches_fla_naive_recurrent_kda():
    ORACLE["kda"] = "fla naive_recurrent_kda (fp32)"
    naive = fla_naive("kda.naive", "naive_recurrent_kda")
    K, V = 3, 4
    layers = run_both("kda", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), F.normalize(rn(B, T, K, seed=2), dim=-1), rn(B, T, V, seed=3)
    g, beta = F.logsigmoid(rn(B, T, K, seed=4) + 2), torch.sigmoid(rn(B, T, seed=5))
    h = lambda a: a[:, :, None]  # noqa: E731
    o, S = naive(h(q), h(k), h(v), h(g), h(beta), output_final_state=True)
    _cmp("kda", layers, dict(q=q, k=k, v=v, g=g, beta=beta), o[:, :, 0], {"S": S[:, 0]}, 1e-5)


def test_rwkv7_matches_fla_dplr_recurrence():
    """RWKV-7 as fla's diagonal-plus-low-rank recurrence: S' = S exp(gk) + beta (alpha S) + k v^T
    with alpha = -kh, beta = a kh (fla's rwkv7 convention); fla scales q by K**-0.5."""
    ORACLE["rwkv7"] = "fla dplr_recurrence (fp32)"
    naive = fla_naive("generalized_delta_rule.dplr.naive", "dplr_recurrence")
    K, V, NH = 3, 4, 2
    layers = run_both("rwkv7", K=K, V=V, NH=NH)
    r, w, k, kk, a = (rn(B, T, NH, K, seed=s) for s in (1, 2, 3, 4, 5))
    v = rn(B, T, NH, V, seed=6)
    kh = l2n(kk)
    lw = -torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * torch.sigmoid(w)
    tr = lambda x: x.transpose(1, 2)  # noqa: E731   [B, H, T, ...]
    o, S = naive(tr(r) * K ** 0.5, tr(k), tr(v), tr(-kh).float(), tr(torch.sigmoid(a) * kh), tr(lw))
    _cmp("rwkv7", layers, dict(r=r, w=w, k=k, v=v, kk=kk, a=a), tr(o), {"S": S}, 1e-5)


def test_ttt_linear_matches_fla_ttt_linear_online():
    """fla's chunk_ttt_linear_ref with mini_batch_size = 1 is TTT-Linear with online GD."""
    ORACLE["ttt_linear"] = "fla chunk_ttt_linear_ref, mini-batch 1 (fp32)"
    ref_fn = fla_naive("ttt.naive", "chunk_ttt_linear_ref")
    D, NH = 4, 2
    layers = run_both("ttt_linear", D=D, NH=NH)
    w, b = 1 + rn(NH, D, seed=7, scale=0.3), rn(NH, D, seed=8, scale=0.3)
    with torch.no_grad():
        for layer in layers:
            layer.w.copy_(w); layer.b.copy_(b)
    q, k, v = (rn(B, T, NH, D, seed=s, scale=0.5) for s in (1, 2, 3))
    lr = 0.2 * torch.sigmoid(rn(B, T, NH, seed=4))      # a stable inner step size
    o, W, Wb = ref_fn(q.float(), k.float(), v.float(), w.float(), b.float(), lr[..., None].float(),
                      scale=D ** -0.5, eps=1e-6, mini_batch_size=1, output_final_state=True)
    _cmp("ttt_linear", layers, dict(q=q, k=k, v=v, lr=lr), o, {"W": W, "Wb": Wb[:, :, 0]}, 1e-4)   # fp32 LayerNorms


def test_titans_matches_the_papers_equations():
    """Behrouz et al. 2024, Eq. (13)-(14) with a linear memory, written here with explicit
    matrices: grad = 2 k (k M - v)^T, S_t = eta S - theta grad(M_{t-1}), M_t = (1 - alpha) M + S_t.
    (fla's naive titans uses a LayerNorm inner model and a different gradient, so it is not
    an oracle for the paper's linear memory.)"""
    ORACLE["titans"] = "Behrouz et al. (2024) equations, hand loop"
    K, V = 3, 4
    layers = run_both("titans", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), F.normalize(rn(B, T, K, seed=2), dim=-1), rn(B, T, V, seed=3)
    theta, eta, alpha = (torch.sigmoid(rn(B, T, seed=s)) for s in (4, 5, 6))
    M, S = rn(B, K, V, seed=7, scale=0.5), rn(B, K, V, seed=8, scale=0.5)
    st0 = {"M": M.clone(), "Sm": S.clone()}
    outs = []
    for t in range(T):
        kt = k[:, t, :, None]                                           # [B, K, 1]
        grad = 2 * kt @ (kt.transpose(1, 2) @ M - v[:, t, None, :])
        S = eta[:, t, None, None] * S - theta[:, t, None, None] * grad
        M = (1 - alpha[:, t, None, None]) * M + S
        outs.append((q[:, t, None, :] @ M)[:, 0])
    _cmp("titans", layers, dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, state=st0),
         torch.stack(outs, 1), {"M": M, "Sm": S}, 1e-10)


def test_longhorn_matches_the_papers_equations():
    """Liu et al. 2024, Eq. (9)-(10), written here: Delta = beta / (1 + beta k^T k),
    S_t = (1 - Delta k^2^T) * S_{t-1} + (Delta x) k^T, y = S_t q."""
    ORACLE["longhorn"] = "Liu et al. (2024) equations, hand loop"
    K, V = 3, 4
    layers = run_both("longhorn", K=K, V=V)
    q, k, x, beta = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3), rn(B, T, V, seed=4)
    S = torch.zeros(B, V, K, dtype=torch.float64)
    ys = []
    for t in range(T):
        bt = torch.sigmoid(beta[:, t])
        dl = bt / (1 + bt * (k[:, t] ** 2).sum(-1, keepdim=True))
        S = (1 - dl[:, :, None] * k[:, t, None, :] ** 2) * S + (dl * x[:, t])[:, :, None] * k[:, t, None, :]
        ys.append(torch.einsum("bvk,bk->bv", S, q[:, t]))
    _cmp("longhorn", layers, dict(q=q, k=k, x=x, beta=beta), torch.stack(ys, 1), {"S": S}, 1e-10)


def test_yaad_matches_the_papers_equations():
    """Behrouz et al. 2025 (Miras), Yaad's update with a linear memory, written here: the
    gradient of the Huber objective (1/2 ||k M - v||^2 if ||k M - v|| <= delta_t, else
    delta_t ||k M - v||_1) in M taken by torch.autograd, M_t = a_t M_{t-1} - lr_t grad, o_t = q_t M_t."""
    ORACLE["yaad"] = "Behrouz et al. (2025) equations, autograd of the Huber objective, hand loop"
    K, V = 3, 4
    layers = run_both("yaad", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    ga, gl, gd = rn(B, T, seed=4) + 2, rn(B, T, seed=5), rn(B, T, seed=6, scale=2) + 1
    M = rn(B, K, V, seed=7, scale=0.5)
    st0 = {"M": M.clone()}
    outs, branches = [], []
    for t in range(T):
        kt, qt = l2n(k[:, t]), l2n(q[:, t])
        dl = F.softplus(gd[:, t])
        Mg = M.clone().requires_grad_(True)
        e = torch.einsum("bk,bkv->bv", kt, Mg) - v[:, t]
        small = e.detach().norm(dim=-1) <= dl
        branches.append(small)
        loss = torch.where(small, 0.5 * (e * e).sum(-1), dl * e.abs().sum(-1)).sum()
        grad, = torch.autograd.grad(loss, Mg)
        M = torch.sigmoid(ga[:, t])[:, None, None] * M - torch.sigmoid(gl[:, t])[:, None, None] * grad
        outs.append(torch.einsum("bk,bkv->bv", qt, M))
    branches = torch.stack(branches)
    assert branches.any() and not branches.all()                 # both branches of the Huber switch
    _cmp("yaad", layers, dict(q=q, k=k, v=v, ga=ga, gl=gl, gd=gd, state=st0), torch.stack(outs, 1), {"M": M}, 1e-10)
