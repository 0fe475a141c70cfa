"""The torch backend's kernels against per-step loops written out here (float64), and the
C scans against the pure-torch fallbacks, forward and backward."""
import pytest
import torch

from recdsl.backends.torch import cpu_kernels, scans

DT = torch.float64


def _loop(kind, a, x, h0):
    h, out = h0, []
    for t in range(x.shape[1]):
        if kind == "diag":
            h = a[:, t] * h + x[:, t]
        elif kind == "diagexp":
            h = torch.exp(a[:, t]) * h + x[:, t]
        elif kind == "maxplus":
            h = torch.maximum(h + a[:, t], x[:, t])
        else:
            h = torch.logaddexp(h + a[:, t], x[:, t])
        out.append(h)
    return torch.stack(out, 1)


def test_c_library_builds_here():
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()


@pytest.mark.parametrize("kind", ["diag", "diagexp", "maxplus", "lse"])
@pytest.mark.parametrize("impl", ["c", "doubling"])
@pytest.mark.parametrize("T", [1, 2, 37, 130])
def test_element_scans(kind, impl, T):
    torch.manual_seed(T)
    B, C = 2, 70  # more channels than one C block
    a = torch.rand(B, T, C, dtype=DT, requires_grad=True)
    x = torch.randn(B, T, C, dtype=DT, requires_grad=True)
    h0 = torch.randn(B, C, dtype=DT, requires_grad=True)
    g = torch.randn(B, T, C, dtype=DT)
    ref = _loop(kind, a, x, h0)
    gr = torch.autograd.grad((ref * g).sum(), [a, x, h0])
    if impl == "c":
        h = cpu_kernels.element_scan(kind, a, x, h0)
    else:
        h = scans.doubling_scan("diag", torch.exp(a), x, h0) if kind == "diagexp" else scans.doubling_scan(kind, a, x, h0)
    gh = torch.autograd.grad((h * g).sum(), [a, x, h0])
    assert torch.allclose(h, ref, atol=1e-12)
    for p, q in zip(gh, gr):
        assert torch.allclose(p, q, atol=1e-10)


@pytest.mark.parametrize("impl", ["c", "doubling"])
def test_block_scan(impl, monkeypatch):
    if impl == "doubling":
        monkeypatch.setattr(scans, "use_c", lambda *ts: False)
    torch.manual_seed(0)
    B, T, C = 2, 19, 3
    A = [[(torch.rand(B, T, C, dtype=DT) * 0.5).requires_grad_() for _ in range(2)] for _ in range(2)]
    xs = [torch.randn(B, T, C, dtype=DT) for _ in range(2)]
    h0s = [torch.randn(B, C, dtype=DT) for _ in range(2)]
    hs = scans.block_scan(A, xs, h0s)
    h1, h2 = h0s
    o1, o2 = [], []
    for t in range(T):
        h1, h2 = (A[0][0][:, t] * h1 + A[0][1][:, t] * h2 + xs[0][:, t],
                  A[1][0][:, t] * h1 + A[1][1][:, t] * h2 + xs[1][:, t])
        o1.append(h1)
        o2.append(h2)
    r1, r2 = torch.stack(o1, 1), torch.stack(o2, 1)
    assert torch.allclose(hs[0], r1, atol=1e-12) and torch.allclose(hs[1], r2, atol=1e-12)
    g = torch.autograd.grad(hs[0].sum() + 2 * hs[1].sum(), A[0][1])[0]
    gr = torch.autograd.grad(r1.sum() + 2 * r2.sum(), A[0][1])[0]
    assert torch.allclose(g, gr, atol=1e-10)


@pytest.mark.parametrize("scalar", [True, False])
@pytest.mark.parametrize("inclusive", [True, False])
@pytest.mark.parametrize("T, chunk", [(37, 8), (16, 16), (5, 64), (150, 64)])
def test_chunk_diag(scalar, inclusive, T, chunk):
    torch.manual_seed(1)
    B, K, V = 2, 4, 3
    q, k, v = torch.randn(B, T, K, dtype=DT), torch.randn(B, T, K, dtype=DT), torch.randn(B, T, V, dtype=DT)
    g = -torch.rand(B, T, dtype=DT) * 3 if scalar else -torch.rand(B, T, K, dtype=DT) * 3
    S0 = torch.randn(B, K, V, dtype=DT)
    (o,), S = scans.chunk_diag([(q, inclusive)], k, v, g, S0, chunk=chunk)
    R, outs = S0, []
    for t in range(T):
        dec = torch.exp(g[:, t])[:, None, None] if scalar else torch.exp(g[:, t])[:, :, None]
        new = dec * R + k[:, t, :, None] * v[:, t, None, :]
        outs.append((q[:, t, None, :] @ (new if inclusive else R))[:, 0])
        R = new
    assert torch.allclose(o, torch.stack(outs, 1), atol=1e-12) and torch.allclose(S, R, atol=1e-12)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T, chunk", [(37, 8), (64, 64), (3, 64)])
def test_chunk_delta(gated, T, chunk):
    torch.manual_seed(2)
    B, K, V = 2, 4, 3
    q = torch.randn(B, T, K, dtype=DT)
    k = torch.nn.functional.normalize(torch.randn(B, T, K, dtype=DT), dim=-1)
    v, beta = torch.randn(B, T, V, dtype=DT), torch.rand(B, T, dtype=DT)
    g = -torch.rand(B, T, dtype=DT) if gated else None
    S0 = torch.randn(B, K, V, dtype=DT)
    o, S = scans.chunk_delta(q, k, v, beta, g, S0, chunk=chunk)
    R, outs = S0, []
    for t in range(T):
        kt = k[:, t]
        dec = torch.exp(g[:, t])[:, None, None] if gated else 1.0
        R = dec * (R - beta[:, t, None, None] * kt[:, :, None] * (kt[:, None, :] @ R)) \
            + beta[:, t, None, None] * kt[:, :, None] * v[:, t, None, :]
        outs.append((q[:, t, None, :] @ R)[:, 0])
    assert torch.allclose(o, torch.stack(outs, 1), atol=1e-11) and torch.allclose(S, R, atol=1e-11)


def test_chunk_diag_is_stable_under_strong_decay():
    torch.manual_seed(3)
    B, T, K, V = 1, 256, 4, 3
    g = torch.full((B, T, K), -50.0, dtype=torch.float32)  # exp(-50 * 16) underflows; no inf / nan
    (o,), S = scans.chunk_diag([(torch.randn(B, T, K), True)], torch.randn(B, T, K), torch.randn(B, T, V), g,
                               torch.zeros(B, K, V))
    assert torch.isfinite(o).all() and torch.isfinite(S).all()


def test_float32_exp_inside_the_scan_matches_torch_exp():
    g = torch.linspace(-100, 90, 20001)[None, :, None]
    # one step at a time (x = 0, h0 = 1): the scan's output is exp(g_t) itself
    one = torch.stack([cpu_kernels.element_scan("diagexp", g[:, t:t + 1], torch.zeros(1, 1, 1), torch.ones(1, 1))[0, 0, 0]
                       for t in range(0, 20001, 97)])
    ref = torch.exp(g[0, ::97, 0])
    finite = torch.isfinite(ref) & (ref > 1e-37)
    assert torch.allclose(one[finite], ref[finite], rtol=3e-7)
    assert (one[ref == 0] == 0).all() and torch.isinf(one[torch.isinf(ref)]).all()


@pytest.mark.parametrize("scalar", [True, False])
@pytest.mark.parametrize("inclusive", [True, False])
def test_matdiag_inference_kernel_matches_chunkwise(scalar, inclusive):
    torch.manual_seed(4)
    B, T, H, K, V = 2, 50, 3, 5, 7
    q, k, v = (torch.randn(B, T, H, n, dtype=DT) for n in (K, K, V))
    g = -torch.rand(B, T, H, dtype=DT) if scalar else -torch.rand(B, T, H, K, dtype=DT)
    S0 = torch.randn(B, H, K, V, dtype=DT)
    fast, S_fast = cpu_kernels.matdiag(q.transpose(1, 2).contiguous().transpose(1, 2), inclusive, k, v, g, S0)
    flat = lambda x: x.transpose(1, 2).reshape((B * H, T) + tuple(x.shape[3:]))  # noqa: E731
    (slow,), S_slow = scans.chunk_diag([(flat(q), inclusive)], flat(k), flat(v), flat(g), S0.reshape(B * H, K, V),
                                       chunk=16)
    assert torch.allclose(fast, slow.reshape(B, H, T, V).transpose(1, 2), atol=1e-12)
    assert torch.allclose(S_fast, S_slow.reshape(B, H, K, V), atol=1e-12)


@pytest.mark.parametrize("gated", [True, False])
def test_delta_inference_kernel_matches_chunkwise(gated):
    torch.manual_seed(6)
    B, T, H, K, V = 2, 45, 2, 4, 5
    q, v = torch.randn(B, T, H, K, dtype=DT), torch.randn(B, T, H, V, dtype=DT)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=DT), dim=-1)
    beta, S0 = torch.rand(B, T, H, dtype=DT), torch.randn(B, H, K, V, dtype=DT)
    g = -torch.rand(B, T, H, dtype=DT) if gated else None
    fast, S_fast = cpu_kernels.delta(q, k, v, beta, g, S0)
    flat = lambda x: x.transpose(1, 2).reshape((B * H, T) + tuple(x.shape[3:]))  # noqa: E731
    slow, S_slow = scans.chunk_delta(flat(q), flat(k), flat(v), flat(beta), None if g is None else flat(g),
                                     S0.reshape(B * H, K, V), chunk=16)
    assert torch.allclose(fast, slow.reshape(B, H, T, V).transpose(1, 2), atol=1e-11)
    assert torch.allclose(S_fast, S_slow.reshape(B, H, K, V), atol=1e-11)
