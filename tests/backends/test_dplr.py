"""The chunkwise DPLR delta rule (backends/torch/dplr.py) against its per-step loop in float64
(values, final state, gradients), under strong decays, in the KDA and RWKV-7
parametrisations (checked against their own update rules written out here), in float32, and
against flash-linear-attention's naive references when fla is installed."""
import pytest
import torch
import torch.nn.functional as Fn

from recdsl.backends.torch import dplr
from recdsl.backends.torch.dplr import LOG_DECAY_FLOOR, chunk_dplr, naive_dplr

DT = torch.float64


def _inputs(N, T, K, V, dtype=DT, seed=0, g_scale=1.0, rank_scale=0.5):
    """Generic DPLR inputs: keys and the rank-one factors scaled so that |bᵀa| stays small."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k = r(N, T, K) / K ** 0.5, r(N, T, K) / K ** 0.5
    a, b = rank_scale * r(N, T, K) / K ** 0.5, rank_scale * r(N, T, K) / K ** 0.5
    v = r(N, T, V)
    g = -g_scale * torch.rand(N, T, K, generator=gen, dtype=dtype)
    S0 = r(N, K, V)
    return q, k, v, a, b, g, S0


def _close(x, ref, tol):
    err = (x - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 5, 31, 32, 33, 100])
def test_float64_parity(T, chunk):
    args = _inputs(3, T, 16, 8, seed=T)
    o_ref, S_ref = naive_dplr(*args)
    o, S = chunk_dplr(*args, chunk=chunk)
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)


@pytest.mark.parametrize("chunk", [1, 2, 8, 128])
def test_other_chunk_sizes(chunk):
    args = _inputs(2, 70, 8, 4, seed=chunk)
    o_ref, S_ref = naive_dplr(*args)
    o, S = chunk_dplr(*args, chunk=chunk)
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)


def test_chunk_must_be_power_of_two():
    with pytest.raises(ValueError):
        chunk_dplr(*_inputs(1, 8, 4, 4), chunk=24)


def test_empty_sequence():
    q, k, v, a, b, g, S0 = _inputs(2, 0, 4, 3)
    o, S = chunk_dplr(q, k, v, a, b, g, S0)
    assert o.shape == (2, 0, 3) and torch.equal(S, S0)


@pytest.mark.parametrize("chunk", [16, 64])
def test_strong_decays(chunk):
    """Decays down to -30 per step and some -1e4 (clamped at the floor): no NaN, same values."""
    q, k, v, a, b, g, S0 = _inputs(2, 100, 16, 8, seed=7)
    gen = torch.Generator().manual_seed(3)
    g = -30 * torch.rand(g.shape, generator=gen, dtype=DT)
    g[torch.rand(g.shape, generator=gen) < 0.05] = -1e4
    g[:, 40:43] = -1e4                                   # whole steps that wipe the state
    o_ref, S_ref = naive_dplr(q, k, v, a, b, g, S0)
    o, S = chunk_dplr(q, k, v, a, b, g, S0, chunk=chunk)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)
    # float32 too
    o32, S32 = chunk_dplr(*(x.float() for x in (q, k, v, a, b, g, S0)), chunk=chunk)
    assert torch.isfinite(o32).all() and torch.isfinite(S32).all()
    _close(o32.double(), o_ref, 1e-5)


def test_floor_matches_clamped_decay():
    q, k, v, a, b, g, S0 = _inputs(1, 20, 4, 3, seed=1)
    g[:, 5] = -1e9
    o1, S1 = chunk_dplr(q, k, v, a, b, g, S0, chunk=8)
    o2, S2 = chunk_dplr(q, k, v, a, b, g.clamp(min=LOG_DECAY_FLOOR), S0, chunk=8)
    _close(o1, o2, 1e-14)
    _close(S1, S2, 1e-14)


def _kda_inputs(N, T, K, V, dtype=DT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q = r(N, T, K)
    k = Fn.normalize(r(N, T, K), dim=-1)
    v = r(N, T, V)
    beta = torch.sigmoid(r(N, T))
    g = Fn.logsigmoid(r(N, T, K) + 2)                    # per-key log decay < 0
    S0 = r(N, K, V)
    return q, k, v, beta, g, S0


def _kda_loop(q, k, v, beta, g, S0):
    """KDA as written: S' = (I - β k kᵀ) diag(e^g) S + β k vᵀ, o = S'ᵀ q."""
    S, outs = S0, []
    I = torch.eye(k.shape[-1], dtype=k.dtype)
    for t in range(q.shape[1]):
        kt, bt = k[:, t], beta[:, t, None, None]
        S = (I - bt * kt[:, :, None] * kt[:, None, :]) @ (torch.exp(g[:, t])[:, :, None] * S) \
            + bt * kt[:, :, None] * v[:, t, None, :]
        outs.append(torch.einsum("nk,nkv->nv", q[:, t], S))
    return torch.stack(outs, 1), S


def _kda_as_dplr(q, k, v, beta, g, S0):
    bk = beta[..., None] * k
    return q, bk, v, -bk, k * torch.exp(g), g, S0        # key β k, a = -β k, b = k ⊙ e^g


@pytest.mark.parametrize("T", [33, 100])
def test_kda(T):
    args = _kda_inputs(2, T, 16, 8, seed=T)
    o_ref, S_ref = _kda_loop(*args)
    o, S = chunk_dplr(*_kda_as_dplr(*args), chunk=32)
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)


def _rwkv7_inputs(N, T, K, V, dtype=DT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    rq, k, v = r(N, T, K), r(N, T, K) / K ** 0.5, r(N, T, V)
    w = torch.exp(-0.6 * torch.sigmoid(r(N, T, K)))      # decay in (e^-0.6, 1), as RWKV-7
    kappa = Fn.normalize(r(N, T, K), dim=-1)
    alpha = torch.sigmoid(r(N, T, K))                    # in-context learning rate in (0, 1)
    S0 = r(N, K, V)
    return rq, k, v, w, kappa, alpha, S0


def _rwkv7_loop(rq, k, v, w, kappa, alpha, S0):
    """RWKV-7 as written: S' = diag(w) S - (α ⊙ κ)(κᵀ S) + k vᵀ, o = S'ᵀ r."""
    S, outs = S0, []
    for t in range(rq.shape[1]):
        ak = alpha[:, t] * kappa[:, t]
        S = w[:, t, :, None] * S - ak[:, :, None] * torch.einsum("nk,nkv->nv", kappa[:, t], S)[:, None, :] \
            + k[:, t, :, None] * v[:, t, None, :]
        outs.append(torch.einsum("nk,nkv->nv", rq[:, t], S))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("T", [31, 100])
def test_rwkv7(T):
    rq, k, v, w, kappa, alpha, S0 = _rwkv7_inputs(2, T, 16, 8, seed=T)
    o_ref, S_ref = _rwkv7_loop(rq, k, v, w, kappa, alpha, S0)
    o, S = chunk_dplr(rq, k, v, -(alpha * kappa), kappa, torch.log(w), S0, chunk=16)
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)


@pytest.mark.parametrize("T,chunk", [(37, 16), (64, 32), (5, 64)])
def test_gradients(T, chunk):
    """Autograd through chunk_dplr against autograd through the loop, all seven inputs."""
    args = [x.requires_grad_() for x in _inputs(2, T, 8, 5, seed=11 + T, g_scale=2.0)]
    gen = torch.Generator().manual_seed(5)
    do = torch.randn(2, T, 5, generator=gen, dtype=DT)
    dS = torch.randn(2, 8, 5, generator=gen, dtype=DT)

    def grads(fn):
        o, S = fn(*args)
        return torch.autograd.grad((o * do).sum() + (S * dS).sum(), args)

    ref = grads(naive_dplr)
    got = grads(lambda *x: chunk_dplr(*x, chunk=chunk))
    for name, gr, gc in zip("q k v a b g S0".split(), ref, got):
        err = (gr - gc).abs().max().item()
        assert err <= 1e-8 * max(1.0, gr.abs().max().item()), (name, err)


def test_gradients_strong_decay():
    q, k, v, a, b, g, S0 = _inputs(1, 40, 8, 4, seed=2)
    g = -30 * torch.rand(g.shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    g[:, 10, :3] = -1e4
    args = [x.requires_grad_() for x in (q, k, v, a, b, g, S0)]
    ref = torch.autograd.grad(sum(t.sum() for t in naive_dplr(*args)), args)
    got = torch.autograd.grad(sum(t.sum() for t in chunk_dplr(*args, chunk=16)), args)
    for gr, gc in zip(ref, got):
        assert torch.isfinite(gc).all()
        assert (gr - gc).abs().max().item() <= 1e-8 * max(1.0, gr.abs().max().item())


def test_no_grad_path_equals_autograd_path():
    """Without gradients the intra-chunk factors are scaled in place; same numbers."""
    args = _inputs(2, 70, 16, 8, seed=3)
    with torch.no_grad():
        o1, S1 = chunk_dplr(*args, chunk=32)
    o2, S2 = chunk_dplr(*[x.clone().requires_grad_() for x in args], chunk=32)
    assert torch.equal(o1, o2.detach()) and torch.equal(S1, S2.detach())


@pytest.mark.parametrize("grad", [False, True])
def test_several_groups(monkeypatch, grad):
    """Chunk positions processed in several groups (state carried between them), padded end."""
    monkeypatch.setattr(dplr, "GROUP_ROWS", 64)             # 2 chunk positions per group here
    args = [x.requires_grad_(grad) for x in _inputs(2, 150, 8, 5, seed=13)]
    o_ref, S_ref = naive_dplr(*args)
    o, S = chunk_dplr(*args, chunk=16)
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)
    if grad:
        ref = torch.autograd.grad(o_ref.sum() + S_ref.sum(), args)
        got = torch.autograd.grad(o.sum() + S.sum(), args)
        for gr, gc in zip(ref, got):
            assert (gr - gc).abs().max().item() <= 1e-8 * max(1.0, gr.abs().max().item())


def test_noncontiguous_inputs():
    q, k, v, a, b, g, S0 = _inputs(3, 70, 8, 4, seed=17)
    t = lambda x: x.transpose(0, 1).contiguous().transpose(0, 1)     # same values, [T, N, .] memory
    o_ref, S_ref = naive_dplr(q, k, v, a, b, g, S0)
    o, S = chunk_dplr(*(t(x) for x in (q, k, v, a, b, g)), S0, chunk=32)
    _close(o, o_ref, 1e-10)
    _close(S, S_ref, 1e-10)


def test_float32():
    args = _inputs(4, 300, 64, 64, seed=9, g_scale=0.5)
    o_ref, S_ref = naive_dplr(*args)
    o, S = chunk_dplr(*(x.float() for x in args), chunk=32)
    assert o.dtype == torch.float32
    rel = lambda x, r: ((x.double() - r).norm() / r.norm()).item()
    assert rel(o, o_ref) < 1e-4 and rel(S, S_ref) < 1e-4


def test_float32_ill_conditioned():
    """Correlated keys with β near 1 make (I - A_ba) badly conditioned inside a chunk: the
    float32 chunked result stays as accurate as the float32 loop (a Neumann-product inverse
    of the 16 x 16 diagonal blocks was ~100x worse here)."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    N, T, K, V = 2, 256, 64, 16
    k = Fn.normalize(0.9 * r(N, 1, K) + 0.1 * r(N, T, K), dim=-1)
    beta = torch.full((N, T), 0.99, dtype=DT)
    g = Fn.logsigmoid(r(N, T, K) + 4)
    args = _kda_as_dplr(r(N, T, K) / 8, k, r(N, T, V), beta, g, torch.zeros(N, K, V, dtype=DT))
    o_ref, _ = naive_dplr(*args)
    rel = lambda o: ((o.double() - o_ref).norm() / o_ref.norm()).item()
    a32 = [x.float() for x in args]
    loop_err = rel(naive_dplr(*a32)[0])
    for chunk in (16, 32, 64):
        assert rel(chunk_dplr(*a32, chunk=chunk)[0]) < 10 * loop_err + 1e-6


# ---- flash-linear-attention's naive references (fp32 inside), when installed ----

def test_fla_dplr_recurrence():
    naive = pytest.importorskip("fla.ops.generalized_delta_rule.dplr.naive")
    q, k, v, a, b, g, S0 = (x.float() for x in _inputs(2, 45, 16, 8, seed=21))
    K = q.shape[-1]
    # fla: S = S ⊙ e^{gk} + k vᵀ + beta (alphaᵀ S), layout [B, H, L, D], q scaled by K^-0.5
    h = lambda x: x[:, None]                             # one head
    o_f, S_f = naive.dplr_recurrence(h(q), h(k), h(v), h(b), h(a), h(g), initial_state=h(S0))
    o, S = chunk_dplr(q * K ** -0.5, k, v, a, b, g, S0, chunk=16)
    _close(o, o_f[:, 0], 1e-5)
    _close(S, S_f[:, 0], 1e-5)


def test_fla_kda():
    naive = pytest.importorskip("fla.ops.kda.naive")
    q, k, v, beta, g, S0 = (x.float() for x in _kda_inputs(2, 45, 16, 8, seed=22))
    K = q.shape[-1]
    h = lambda x: x[:, :, None]                          # [B, T, H=1, ...]
    o_f, S_f = naive.naive_recurrent_kda(h(q), h(k), h(v), h(g), h(beta), initial_state=S0[:, None],
                                         output_final_state=True)
    o, S = chunk_dplr(*_kda_as_dplr(q * K ** -0.5, k, v, beta, g, S0), chunk=32)
    _close(o, o_f[:, :, 0], 1e-5)
    _close(S, S_f[:, 0], 1e-5)
