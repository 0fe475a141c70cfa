"""stdlib/diagonal: load + classes, reference vs torch, and an oracle per cell:
accelerated-scan's reference scan (accelerated_scan.ref.scan) fed with the gates and
tokens computed here from the paper's equations, fla's naive HGRN, complex-number loops
(LRU, GateLoop, S5) and the convolution view of time-invariant SSMs (S4D, MEGA's EMA)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recdsl.lowering import ElementScan
from recdsl import plan as PL

from .common import (B, T, ORACLE, P, check_backends, check_loads, close, family_cells, fla_naive, require, rn,
                     run_both)

EXPECTED = {
    "mingru": {"h": PL.DIAGONAL},
    "minlstm": {"h": PL.DIAGONAL},
    "qrnn": {"h": PL.DIAGONAL},
    "sru": {"c": PL.DIAGONAL},
    "lru": {"hr": PL.BLOCK_DIAGONAL, "hi": PL.BLOCK_DIAGONAL},
    "rglru": {"h": PL.DIAGONAL},
    "hgrn": {"h": PL.DIAGONAL},
    "mamba": {"h": PL.DIAGONAL},
    "s4d": {"h": PL.DIAGONAL},
    "gateloop": {"Sr": PL.BLOCK_DIAGONAL, "Si": PL.BLOCK_DIAGONAL},
    "mega_ema": {"h": PL.DIAGONAL},
    "s5": {"x.re": PL.BLOCK_DIAGONAL, "x.im": PL.BLOCK_DIAGONAL},   # a complex state: its parts
}


def test_family_is_complete():
    assert set(family_cells("diagonal")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_and_classes(name):
    plan = check_loads(name, EXPECTED[name])
    s = plan.stages[0]
    if s.cls == PL.DIAGONAL:
        assert s.decay == "elementwise" and isinstance(plan.form(s.index), ElementScan)
    else:
        assert s.block == 2  # complex diagonal as 2x2 rotation-scaling blocks


def test_readouts():
    from recdsl import load
    for name in ("mingru", "minlstm", "qrnn", "rglru", "hgrn", "mamba", "s4d", "mega_ema", "lru", "gateloop", "s5"):
        assert load(name).plan().outputs[0].kind == "linear readout", name
    assert load("sru").plan().outputs[0].kind == "epilogue"      # r * tanh(c') + (1 - r) * x


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree(name):
    check_backends(name)


# ---------------------------------------------------------------------------- oracles

def ascan(gates, tokens):
    """accelerated-scan's reference: x_t = a_t x_{t-1} + b_t, its layout [B, C, T]."""
    ref = require("accelerated_scan.ref")
    Bn, Tn = gates.shape[:2]
    g = gates.reshape(Bn, Tn, -1).transpose(1, 2).contiguous()
    x = tokens.reshape(Bn, Tn, -1).transpose(1, 2).contiguous()
    return ref.scan(g, x).transpose(1, 2).reshape(tokens.shape)


def _check(name, layers, xs, want, states, tol=1e-10):
    for layer in layers:
        out, st = layer(**xs)
        close(out, want, tol, f"{name} output ({layer.backend_name})", name)
        for k, v in states.items():
            close(st[k], v, tol, f"{name} {k} ({layer.backend_name})", name)


def test_mingru_matches_accelerated_scan():
    ORACLE["mingru"] = "accelerated-scan ref.scan"
    D, H = 3, 4
    layers = run_both("mingru", D=D, H=H)
    x = rn(B, T, D, seed=1)
    z = torch.sigmoid(x @ P(layers[0], "W_z").T)
    h = ascan(1 - z, z * (x @ P(layers[0], "W_h").T))
    _check("mingru", layers, {"x": x}, h, {"h": h[:, -1]})


def test_minlstm_matches_accelerated_scan():
    ORACLE["minlstm"] = "accelerated-scan ref.scan"
    D, H = 3, 4
    layers = run_both("minlstm", D=D, H=H)
    x = rn(B, T, D, seed=1)
    f, i = torch.sigmoid(x @ P(layers[0], "W_f").T), torch.sigmoid(x @ P(layers[0], "W_i").T)
    h = ascan(f / (f + i), i / (f + i) * (x @ P(layers[0], "W_h").T))
    _check("minlstm", layers, {"x": x}, h, {"h": h[:, -1]})


def test_qrnn_matches_accelerated_scan():
    ORACLE["qrnn"] = "accelerated-scan ref.scan"
    D, H = 3, 4
    layers = run_both("qrnn", D=D, H=H)
    x = rn(B, T, D, seed=1)
    z, f = torch.tanh(x @ P(layers[0], "W_z").T), torch.sigmoid(x @ P(layers[0], "W_f").T)
    h = ascan(f, (1 - f) * z)
    _check("qrnn", layers, {"x": x}, h, {"h": h[:, -1]})


def test_sru_matches_accelerated_scan():
    ORACLE["sru"] = "accelerated-scan ref.scan"
    D = 4
    layers = run_both("sru", D=D)
    with torch.no_grad():
        for layer in layers:
            layer.b_f.copy_(rn(D, seed=5)); layer.b_r.copy_(rn(D, seed=6))
    x = rn(B, T, D, seed=1)
    L = layers[0]
    f = torch.sigmoid(x @ P(L, "W_f").T + P(L, "b_f"))
    r = torch.sigmoid(x @ P(L, "W_r").T + P(L, "b_r"))
    c = ascan(f, (1 - f) * (x @ P(L, "W").T))
    _check("sru", layers, {"x": x}, r * torch.tanh(c) + (1 - r) * x, {"c": c[:, -1]})


def test_rglru_matches_accelerated_scan():
    """Griffin's log-space a = exp(c r log sigmoid(Lambda)), sqrt(1 - a^2) normalisation."""
    ORACLE["rglru"] = "accelerated-scan ref.scan"
    D, c = 4, 8.0
    layers = run_both("rglru", D=D)
    with torch.no_grad():
        for layer in layers:
            layer.b_a.copy_(rn(D, seed=7, scale=0.5)); layer.b_x.copy_(rn(D, seed=8, scale=0.5))
    L = layers[0]
    x = rn(B, T, D, seed=1)
    r = torch.sigmoid(x @ P(L, "W_a").T + P(L, "b_a"))
    i = torch.sigmoid(x @ P(L, "W_x").T + P(L, "b_x"))
    log_a = c * r * F.logsigmoid(P(L, "Lambda"))
    h = ascan(torch.exp(log_a), torch.sqrt(-torch.expm1(2 * log_a)) * (i * x))
    _check("rglru", layers, {"x": x}, h, {"h": h[:, -1]})


def test_hgrn_matches_accelerated_scan_and_fla_naive_hgrn():
    ORACLE["hgrn"] = "fla naive_recurrent_hgrn (fp32), accelerated-scan ref.scan"
    naive = fla_naive("hgrn.naive", "naive_recurrent_hgrn")
    D, H, lb = 3, 4, 0.25
    layers = run_both("hgrn", D=D, H=H)
    L = layers[0]
    x = rn(B, T, D, seed=1)
    f = lb + (1 - lb) * torch.sigmoid(x @ P(L, "W_f").T + P(L, "b_f"))
    cnd = F.silu(x @ P(L, "W_c").T)
    h = ascan(f, (1 - f) * cnd)
    gate = torch.sigmoid(x @ P(L, "W_g").T)
    _check("hgrn", layers, {"x": x}, h * gate, {"h": h[:, -1]})
    hf, hT = naive((1 - f) * cnd, torch.log(f), output_final_state=True)   # [B, T, D]: h' = exp(g) h + x
    for layer in layers:
        out, st = layer(x=x)
        close(out, hf * gate, 1e-5, "HGRN vs fla (fp32)", "hgrn")
        close(st["h"], hT, 1e-5, "HGRN h vs fla (fp32)", "hgrn")


def test_mamba_matches_accelerated_scan():
    """S6 (Gu & Dao 2023, Alg. 2): dA = exp(delta A), dB x = delta B x, y = C h + D x."""
    ORACLE["mamba"] = "accelerated-scan ref.scan"
    D, N = 3, 4
    layers = run_both("mamba", D=D, N=N)
    with torch.no_grad():
        for layer in layers:
            layer.Dskip.copy_(rn(D, seed=3))
    L = layers[0]
    x, dt, Bm, Cm = rn(B, T, D, seed=1), rn(B, T, D, seed=2), rn(B, T, N, seed=3), rn(B, T, N, seed=4)
    delta = F.softplus(dt)
    A = -torch.exp(P(L, "A_log"))                                                     # [D, N]
    h = ascan(torch.exp(delta[..., None] * A), (delta * x)[..., None] * Bm[:, :, None, :])   # [B, T, D, N]
    y = torch.einsum("btdn,btn->btd", h, Cm) + P(L, "Dskip") * x
    _check("mamba", layers, dict(x=x, dt=dt, B=Bm, C=Cm), y, {"h": h[:, -1]})


def test_lru_matches_a_complex_loop():
    """Orvieto et al. 2023, Eq. (7) with complex numbers: lambda = exp(-exp(nu) + i exp(theta)),
    h_t = lambda h_{t-1} + gamma (B x_t), y_t = Re(C h_t)."""
    ORACLE["lru"] = "complex128 loop (Orvieto et al. 2023)"
    D, N = 3, 4
    layers = run_both("lru", D=D, N=N)
    L = layers[0]
    lam = torch.exp(torch.complex(-torch.exp(P(L, "nu_log")), torch.exp(P(L, "theta_log"))))
    gamma = torch.sqrt(1 - lam.abs() ** 2)
    Bc = torch.complex(P(L, "B_re"), P(L, "B_im"))
    Cc = torch.complex(P(L, "C_re"), P(L, "C_im"))
    x = rn(B, T, D, seed=1)
    h = torch.zeros(B, N, dtype=torch.complex128)
    ys = []
    for t in range(T):
        h = lam * h + gamma * (x[:, t].to(torch.complex128) @ Bc.T)
        ys.append((h @ Cc.T).real)
    _check("lru", layers, {"x": x}, torch.stack(ys, 1), {"hr": h.real, "hi": h.imag})


def test_gateloop_matches_a_complex_loop():
    """Katsch 2023: h_t = a_t * h_{t-1} + k_t^T v_t with complex a_t, y_t = Re(q_t h_t)."""
    ORACLE["gateloop"] = "complex128 loop (Katsch 2023)"
    K, V = 3, 4
    layers = run_both("gateloop", K=K, V=V)
    q, k, v = rn(B, T, K, seed=1), rn(B, T, K, seed=2), rn(B, T, V, seed=3)
    mag, ph = rn(B, T, K, seed=4), rn(B, T, K, seed=5, scale=2.0)
    a = torch.sigmoid(mag) * torch.exp(1j * ph.to(torch.complex128))
    S = torch.zeros(B, K, V, dtype=torch.complex128)
    ys = []
    for t in range(T):
        S = a[:, t, :, None] * S + (k[:, t, :, None] * v[:, t, None, :]).to(torch.complex128)
        ys.append(torch.einsum("bk,bkv->bv", q[:, t].to(torch.complex128), S).real)
    _check("gateloop", layers, dict(q=q, k=k, v=v, a_mag=mag, a_phase=ph), torch.stack(ys, 1),
           {"Sr": S.real, "Si": S.imag})


def _causal_conv(kernel, x):
    """y_t = sum_{j<=t} kernel[t-j] * x_j per channel; kernel [T, D], x [B, T, D]."""
    Tn = x.shape[1]
    return torch.stack([sum(kernel[t - j] * x[:, j] for j in range(t + 1)) for t in range(Tn)], 1)


def test_s4d_matches_its_convolution_kernel():
    """S4D's convolution view (Gu et al. 2022, Eq. (5)): K_l = sum_n C_n dB_n dA_n^l with ZOH
    dA = exp(dt A), dB = (dA - 1)/A B; y = K * x + D x."""
    ORACLE["s4d"] = "convolution kernel of the SSM (Gu et al. 2022)"
    D, N = 3, 4
    layers = run_both("s4d", D=D, N=N)
    L = layers[0]
    with torch.no_grad():
        for layer in layers:
            layer.B.copy_(rn(D, N, seed=6)); layer.Dskip.copy_(rn(D, seed=7))
    dt = torch.exp(P(L, "log_dt"))[:, None] * 10        # log_dt init is small; keep the test informative
    with torch.no_grad():
        for layer in layers:
            layer.log_dt.add_(math.log(10))
    A = -torch.exp(P(L, "A_log"))
    dA = torch.exp(dt * A)
    dB = (dA - 1) / A * P(L, "B")
    kern = torch.stack([(P(L, "C") * dB * dA ** l).sum(-1) for l in range(T)])   # [T, D]
    x = rn(B, T, D, seed=1)
    y = _causal_conv(kern, x) + P(L, "Dskip") * x
    hT = sum((dB * dA ** (T - 1 - j)) * x[:, j, :, None] for j in range(T))
    _check("s4d", layers, {"x": x}, y, {"h": hT})


def test_mega_ema_matches_its_convolution_kernel():
    """MEGA (Ma et al. 2022, Eq. (3)-(4)): the damped EMA as a convolution with kernel
    K_l = sum_n eta_n alpha_n beta_n (1 - alpha_n delta_n)^l."""
    ORACLE["mega_ema"] = "EMA convolution kernel (Ma et al. 2022)"
    D, NE = 3, 4
    layers = run_both("mega_ema", D=D, NE=NE)
    L = layers[0]
    a, d = torch.sigmoid(P(L, "alpha_raw")), torch.sigmoid(P(L, "delta_raw"))
    kern = torch.stack([(P(L, "eta") * a * P(L, "beta") * (1 - a * d) ** l).sum(-1) for l in range(T)])
    x = rn(B, T, D, seed=1)
    hT = sum(a * P(L, "beta") * (1 - a * d) ** (T - 1 - j) * x[:, j, :, None] for j in range(T))
    _check("mega_ema", layers, {"x": x}, _causal_conv(kern, x), {"h": hT})


def test_s5_matches_a_complex_loop():
    """Smith et al. 2023, Eqs. (2)-(6), with complex numbers: Lambda_bar = exp(Lambda Delta),
    B_bar = (Lambda_bar - 1) / Lambda * B~ (ZOH), x_k = Lambda_bar x_{k-1} + B_bar u_k,
    y_k = Re(C~ x_k) + D u_k. The complex params are stored with a trailing axis of 2, which
    torch.view_as_complex reads; the complex state comes back as its parts x.re, x.im."""
    ORACLE["s5"] = "complex128 loop (Smith et al. 2023)"
    H, Pn = 3, 4
    layers = run_both("s5", H=H, P=Pn)
    with torch.no_grad():                          # larger steps than the init: an informative test
        for layer in layers:
            layer.log_step.copy_(rn(Pn, seed=5, scale=0.5) - 1.0)
    L = layers[0]
    lam = torch.view_as_complex(P(L, "Lambda").contiguous())                         # [P]
    Bc, Cc = torch.view_as_complex(P(L, "B").contiguous()), torch.view_as_complex(P(L, "C").contiguous())
    delta = torch.exp(P(L, "log_step"))
    lam_bar = torch.exp(lam * delta)
    B_bar = ((lam_bar - 1) / lam)[:, None] * Bc                                       # [P, H]
    u = rn(B, T, H, seed=1)
    x = torch.zeros(B, Pn, dtype=torch.complex128)
    ys = []
    for t in range(T):
        x = lam_bar * x + u[:, t].to(torch.complex128) @ B_bar.T
        ys.append((x @ Cc.T).real + P(L, "D") * u[:, t])
    assert lam_bar.imag.abs().max() > 0.1                                             # rotations are exercised
    _check("s5", layers, {"u": u}, torch.stack(ys, 1), {"x.re": x.real, "x.im": x.imag})
