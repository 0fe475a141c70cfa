"""stdlib/nonlinear: load + classes, reference vs torch, and an oracle per cell:
torch.nn.RNN / LSTM / GRU, flashrnn's vanilla backend (Elman, LSTM, sLSTM), or the paper's
equations written out here, independently of the .rec text (said so per test)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recdsl.lowering import NewtonSolve, SequentialLoop
from recdsl import plan as PL

from .common import B, T, ORACLE, P, against, check_backends, check_loads, family_cells, make, rn, run_both

EXPECTED = {
    "elman": {"h": PL.NONLINEAR},
    "elman_relu": {"h": PL.NONLINEAR},
    "lstm": {"h": PL.NONLINEAR, "c": PL.NONLINEAR},
    "lstm_peephole": {"h": PL.NONLINEAR, "c": PL.NONLINEAR},
    "gru": {"h": PL.NONLINEAR},
    "mgu": {"h": PL.NONLINEAR},
    "indrnn": {"h": PL.NONLINEAR},
    "slstm": {"c": PL.NONLINEAR, "n": PL.NONLINEAR, "m": PL.NONLINEAR, "y": PL.NONLINEAR},
    "lem": {"y": PL.NONLINEAR, "z": PL.NONLINEAR},
    "ltc": {"h": PL.NONLINEAR},
    "paragru": {"h": PL.NONLINEAR},
    "paralstm": {"h": PL.NONLINEAR, "c": PL.NONLINEAR},
    "alrnn": {"z": PL.NONLINEAR},
    "cfc": {"h": PL.NONLINEAR},
    "scrn": {"s": PL.DIAGONAL, "h": PL.NONLINEAR},     # the slow context is a constant-decay scan
}
JACOBIAN = {"elman": "dense", "elman_relu": "dense", "lstm": "dense", "lstm_peephole": "dense", "gru": "dense",
            "mgu": "dense", "slstm": "dense", "lem": "dense", "ltc": "dense",
            "indrnn": "diagonal", "paragru": "diagonal", "paralstm": "block-diagonal (k=2)",
            "alrnn": "dense", "cfc": "dense", "scrn": "dense"}


def test_family_is_complete():
    assert set(family_cells("nonlinear")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_and_classes(name):
    plan = check_loads(name, EXPECTED[name])
    s = plan.stages[-1]
    assert s.jacobian == JACOBIAN[name], (name, s.jacobian)
    if JACOBIAN[name] != "dense":
        assert isinstance(plan.form(s.index), SequentialLoop)  # exact backends: the loop first
        assert isinstance(plan.candidates[s.index][-1], NewtonSolve)   # then parallel Newton (backend="newton")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree(name):
    check_backends(name)


# ---------------------------------------------------------------------------- oracles

def _torch_rnn(name, cls, D, H, **kw):
    ORACLE[name] = f"torch.nn.{cls.__name__}"
    ref, fast = run_both(name, D=D, H=H)
    mod = cls(D, H, batch_first=True, **kw).double()
    with torch.no_grad():
        mod.weight_ih_l0.copy_(P(ref, "W_ih")); mod.weight_hh_l0.copy_(P(ref, "W_hh"))
        mod.bias_ih_l0.copy_(P(ref, "b_ih")); mod.bias_hh_l0.copy_(P(ref, "b_hh"))
    x = rn(B, T, D, seed=1)
    h0 = rn(B, H, seed=2, scale=0.5)
    c0 = rn(B, H, seed=3, scale=0.5)
    for layer in (ref, fast):
        if cls is torch.nn.LSTM:
            y, st = layer(x=x, state={"h": h0, "c": c0})
            want, (wh, wc) = mod(x, (h0[None], c0[None]))
            against(name, lambda o, s: (o, s), want, {"h": wh[0], "c": wc[0]}, layer, x=x, state={"h": h0, "c": c0})
        else:
            want, wh = mod(x, h0[None])
            against(name, lambda o, s: (o, s), want, {"h": wh[0]}, layer, x=x, state={"h": h0})


def test_elman_matches_torch_rnn_tanh():
    _torch_rnn("elman", torch.nn.RNN, 3, 4, nonlinearity="tanh")


def test_elman_relu_matches_torch_rnn_relu():
    _torch_rnn("elman_relu", torch.nn.RNN, 3, 4, nonlinearity="relu")


def test_lstm_matches_torch_lstm():
    _torch_rnn("lstm", torch.nn.LSTM, 3, 4)


def test_gru_matches_torch_gru():
    _torch_rnn("gru", torch.nn.GRU, 3, 4)


def _flashrnn(function, Wx, R, b):
    """flashrnn's vanilla (pure torch) backend; Wx [B, T, G, NH, D], R [G, NH, D, D] (out, in),
    b [G, NH, D]; returns its state sequences [S, B, T, NH, D]."""
    from .common import require
    fr = require("flashrnn")
    h, _ = fr.flashrnn(Wx, R, b, function=function, backend="vanilla", dtype="float64")
    return h


def test_elman_and_lstm_match_flashrnn_vanilla():
    D, H = 3, 4
    x = rn(B, T, D, seed=1)
    e = make("elman", D=D, H=H)
    Wx = (x @ P(e, "W_ih").T)[:, :, None, None, :]
    h = _flashrnn("elman", Wx, P(e, "W_hh")[None, None], (P(e, "b_ih") + P(e, "b_hh"))[None, None])
    y, st = e(x=x)
    from .common import close
    close(y, h[0, :, :, 0], 1e-10, "Elman vs flashrnn", "elman")
    ls = make("lstm", D=D, H=H)
    Wx = (x @ P(ls, "W_ih").T).reshape(B, T, 4, 1, H)
    R = P(ls, "W_hh").reshape(4, 1, H, H)
    bb = (P(ls, "b_ih") + P(ls, "b_hh")).reshape(4, 1, H)
    hs = _flashrnn("lstm", Wx, R, bb)
    y, st = ls(x=x)
    close(y, hs[0, :, :, 0], 1e-10, "LSTM vs flashrnn (h)", "lstm")
    close(st["c"], hs[1, :, -1, 0], 1e-10, "LSTM vs flashrnn (c)", "lstm")
    ORACLE["elman"] = ORACLE.get("elman", "torch.nn.RNN") + ", flashrnn vanilla"
    ORACLE["lstm"] = ORACLE.get("lstm", "torch.nn.LSTM") + ", flashrnn vanilla"


def test_slstm_matches_flashrnn_vanilla_slstm():
    """flashrnn's sLSTM starts its stabiliser at m = i-preactivation (ours at 0) and clamps
    n >= 1 (never active under the stabiliser): the outputs y and the ratio c/n agree."""
    ORACLE["slstm"] = "flashrnn vanilla sLSTM"
    D, H, NH = 3, 4, 2
    ref, fast = run_both("slstm", heads=NH, D=D, H=H, NH=NH)
    with torch.no_grad():
        for layer in (ref, fast):
            layer.b.copy_(rn(NH, 4 * H, seed=9, scale=0.5))
    x = rn(B, T, NH, D, seed=1, scale=1.5)
    W, R, b = P(ref, "W"), P(ref, "R"), P(ref, "b")                  # [NH, 4H, D], [NH, 4H, H], [NH, 4H]
    Wx = torch.einsum("bthd,hgd->bthg", x, W).reshape(B, T, NH, 4, H).permute(0, 1, 3, 2, 4)
    Rf = R.reshape(NH, 4, H, H).permute(1, 0, 2, 3)
    bf = b.reshape(NH, 4, H).permute(1, 0, 2)
    hs = _flashrnn("slstm", Wx.contiguous(), Rf.contiguous(), bf.contiguous())   # y, c, n, m
    from .common import close
    for layer in (ref, fast):
        y, st = layer(x=x)
        close(y, hs[0], 1e-10, f"sLSTM y ({layer.backend_name})", "slstm")
        close(st["c"] / st["n"], hs[1, :, -1] / hs[2, :, -1], 1e-10, "sLSTM c/n", "slstm")


def _hand(name, xs, want, states, *layers, tol=1e-10):
    for layer in layers:
        out, st = layer(**xs)
        from .common import close
        close(out, want, tol, f"{name} output ({layer.backend_name})", name)
        for k, v in states.items():
            close(st[k], v, tol, f"{name} {k} ({layer.backend_name})", name)


def test_lstm_peephole_matches_the_papers_equations():
    """Greff et al. 2015, Eq. (vanilla LSTM), written here: i, f peep at c_{t-1}, o at c_t."""
    ORACLE["lstm_peephole"] = "Greff et al. (2015) equations, hand loop"
    D, H = 3, 4
    ref, fast = run_both("lstm_peephole", D=D, H=H)
    x = rn(B, T, D, seed=1, scale=1.5)
    W, R, b = P(ref, "W"), P(ref, "R"), P(ref, "b")
    pi, pf, po = P(ref, "p_i"), P(ref, "p_f"), P(ref, "p_o")
    Wz, Wi, Wf, Wo = W[2 * H:3 * H], W[:H], W[H:2 * H], W[3 * H:]
    Rz, Ri, Rf, Ro = R[2 * H:3 * H], R[:H], R[H:2 * H], R[3 * H:]
    bz, bi, bf, bo = b[2 * H:3 * H], b[:H], b[H:2 * H], b[3 * H:]
    h = c = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        xt = x[:, t]
        z = torch.tanh(xt @ Wz.T + h @ Rz.T + bz)
        i = torch.sigmoid(xt @ Wi.T + h @ Ri.T + pi * c + bi)
        f = torch.sigmoid(xt @ Wf.T + h @ Rf.T + pf * c + bf)
        c = z * i + c * f
        o = torch.sigmoid(xt @ Wo.T + h @ Ro.T + po * c + bo)
        h = torch.tanh(c) * o
        ys.append(h)
    _hand("lstm_peephole", {"x": x}, torch.stack(ys, 1), {"h": h, "c": c}, ref, fast)


def test_mgu_matches_the_papers_equations():
    """Zhou et al. 2016, Eq. (MGU), written here."""
    ORACLE["mgu"] = "Zhou et al. (2016) equations, hand loop"
    D, H = 3, 4
    ref, fast = run_both("mgu", D=D, H=H)
    x = rn(B, T, D, seed=1, scale=1.5)
    g = {n: P(ref, n) for n in ("W_f", "U_f", "b_f", "W_h", "U_h", "b_h")}
    h = rn(B, H, seed=2, scale=0.5)
    h0 = h.clone()
    ys = []
    for t in range(T):
        f = torch.sigmoid(x[:, t] @ g["W_f"].T + h @ g["U_f"].T + g["b_f"])
        ht = torch.tanh(x[:, t] @ g["W_h"].T + (f * h) @ g["U_h"].T + g["b_h"])
        h = (1 - f) * h + f * ht
        ys.append(h)
    for layer in (ref, fast):
        y, st = layer(x=x, state={"h": h0})
        from .common import close
        close(y, torch.stack(ys, 1), 1e-10, "MGU output", "mgu")
        close(st["h"], h, 1e-10, "MGU h", "mgu")


def test_indrnn_matches_the_papers_equations():
    """Li et al. 2018, Eq. (2): h_t = relu(W x_t + u * h_{t-1} + b), written here."""
    ORACLE["indrnn"] = "Li et al. (2018) equations, hand loop"
    D, H = 3, 5
    ref, fast = run_both("indrnn", D=D, H=H)
    with torch.no_grad():
        for layer in (ref, fast):
            layer.b.copy_(rn(H, seed=5, scale=0.3))
    x = rn(B, T, D, seed=1)
    h = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = torch.relu(x[:, t] @ P(ref, "W").T + P(ref, "u") * h + P(ref, "b"))
        ys.append(h)
    assert (torch.stack(ys) == 0).any() and (torch.stack(ys) > 0).any()
    _hand("indrnn", {"x": x}, torch.stack(ys, 1), {"h": h}, ref, fast)


def test_lem_matches_the_papers_equations():
    """Rusch et al. 2021, Eq. (3) as in the authors' LEM cell, written here."""
    ORACLE["lem"] = "Rusch et al. (2021) equations, hand loop"
    D, H, dt = 3, 4, 1.0
    ref, fast = run_both("lem", D=D, H=H)
    x = rn(B, T, D, seed=1, scale=1.5)
    V, b, W, Wy, by = (P(ref, n) for n in ("V", "b", "W", "W_y", "b_y"))
    Vs, bs, Ws = V.split(H), b.split(H), W.split(H)
    y = z = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        u = x[:, t]
        dtn = dt * torch.sigmoid(u @ Vs[0].T + bs[0] + y @ Ws[0].T)
        dtb = dt * torch.sigmoid(u @ Vs[1].T + bs[1] + y @ Ws[1].T)
        z = (1 - dtn) * z + dtn * torch.tanh(u @ Vs[2].T + bs[2] + y @ Ws[2].T)
        y = (1 - dtb) * y + dtb * torch.tanh(z @ Wy.T + by + u @ Vs[3].T + bs[3])
        ys.append(y)
    _hand("lem", {"x": x}, torch.stack(ys, 1), {"y": y, "z": z}, ref, fast)


def test_ltc_matches_the_fused_solver():
    """Hasani et al. 2020, Eq. (3), the fused ODE solver, 6 unfolds of dt/6, written here."""
    ORACLE["ltc"] = "Hasani et al. (2020) fused solver, hand loop"
    D, H, L, dt = 3, 4, 6, 1.0
    ref, fast = run_both("ltc", D=D, H=H)
    x = rn(B, T, D, seed=1, scale=1.5)
    Win, Wrec, b, A, tau = (P(ref, n) for n in ("W_in", "W_rec", "b", "A", "tau"))
    h = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        for _ in range(L):
            f = torch.sigmoid(h @ Wrec.T + x[:, t] @ Win.T + b)
            h = (h + dt / L * f * A) / (1 + dt / L * (1 / tau + f))
        ys.append(h)
    _hand("ltc", {"x": x}, torch.stack(ys, 1), {"h": h}, ref, fast)


def test_paragru_matches_the_papers_equations():
    """Danieli et al. 2025, ParaGRU (GRU with diagonal recurrence), written here."""
    ORACLE["paragru"] = "Danieli et al. (2025) equations, hand loop"
    D, H = 3, 4
    ref, fast = run_both("paragru", D=D, H=H)
    with torch.no_grad():
        for layer in (ref, fast):
            layer.b.copy_(rn(3 * H, seed=4, scale=0.5))
    x = rn(B, T, D, seed=1, scale=1.5)
    W, b = P(ref, "W"), P(ref, "b")
    az, ar, an = P(ref, "a_z"), P(ref, "a_r"), P(ref, "a_n")
    h = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        gz, gr, gn = (x[:, t] @ W.T + b).split(H, -1)
        z = torch.sigmoid(gz + az * h)
        r = torch.sigmoid(gr + ar * h)
        n = torch.tanh(gn + r * an * h)
        h = (1 - z) * h + z * n
        ys.append(h)
    _hand("paragru", {"x": x}, torch.stack(ys, 1), {"h": h}, ref, fast)


def test_paralstm_matches_the_papers_equations():
    """Danieli et al. 2025, ParaLSTM-CIFG (coupled gates, diagonal recurrence), written here."""
    ORACLE["paralstm"] = "Danieli et al. (2025) equations, hand loop"
    D, H = 3, 4
    ref, fast = run_both("paralstm", D=D, H=H)
    x = rn(B, T, D, seed=1, scale=1.5)
    W, b = P(ref, "W"), P(ref, "b")
    af, ag, ao = P(ref, "a_f"), P(ref, "a_g"), P(ref, "a_o")
    h = c = torch.zeros(B, H, dtype=torch.float64)
    ys = []
    for t in range(T):
        gf, gg, go = (x[:, t] @ W.T + b).split(H, -1)
        f = torch.sigmoid(gf + af * h)
        c = f * c + (1 - f) * torch.tanh(gg + ag * h)
        h = torch.sigmoid(go + ao * h) * torch.tanh(c)
        ys.append(h)
    _hand("paralstm", {"x": x}, torch.stack(ys, 1), {"h": h, "c": c}, ref, fast)


def test_alrnn_matches_the_papers_equations():
    """Brenner et al. 2024, Eq. (2) with inputs, written here: z_t = A z_{t-1} + W Phi*(z_{t-1}) + h + C s_t,
    Phi*(z) = (z_1, ..., z_{M-P}, max(0, z_{M-P+1}), ..., max(0, z_M)) as a concatenation."""
    ORACLE["alrnn"] = "Brenner et al. (2024) equations, hand loop"
    D, M, P_ = 3, 6, 4
    ref, fast = run_both("alrnn", D=D, M=M, P=P_)
    with torch.no_grad():                       # a W and h large enough that the ReLUs switch
        for layer in (ref, fast):
            layer.W.copy_(rn(M, M, seed=4, scale=0.5)); layer.h.copy_(rn(M, seed=5, scale=0.3))
    s = rn(B, T, D, seed=1, scale=1.5)
    A, W, h, C = (P(ref, n) for n in ("A", "W", "h", "C"))
    z0 = rn(B, M, seed=2)
    z, ys, relu_args = z0.clone(), [], []
    for t in range(T):
        relu_args.append(z[:, M - P_:])
        phi = torch.cat([z[:, :M - P_], torch.clamp(z[:, M - P_:], min=0)], -1)
        z = A * z + phi @ W.T + h + s[:, t] @ C.T
        ys.append(z)
    relu_args = torch.stack(relu_args)
    assert (relu_args < 0).any() and (relu_args > 0).any()
    for layer in (ref, fast):
        y, st = layer(s=s, state={"z": z0})
        from .common import close
        close(y, torch.stack(ys, 1), 1e-10, f"ALRNN output ({layer.backend_name})", "alrnn")
        close(st["z"], z, 1e-10, f"ALRNN z ({layer.backend_name})", "alrnn")


def test_cfc_matches_the_papers_equations():
    """Hasani et al. 2022, Eq. (10) as in the authors' ncps CfCCell (default mode), written here:
    x(t) = sigma(-f t) * g + (1 - sigma(-f t)) * h with the time argument f t taken as t_a * ts + t_b,
    g, h, t_a, t_b heads of one LeCun-tanh backbone over [x; h_prev]; irregular elapsed times ts."""
    ORACLE["cfc"] = "Hasani et al. (2022) equations, hand loop"
    D, H, U = 3, 4, 5
    ref, fast = run_both("cfc", D=D, H=H, U=U)
    x = rn(B, T, D, seed=1, scale=1.5)
    ts = 0.1 + 2 * torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Wbb = torch.cat([P(ref, "W_x"), P(ref, "W_h")], 1)      # the backbone over cat([x, h])
    bbb = P(ref, "b_bb")
    heads = {n: (P(ref, "W_" + n), P(ref, "b_" + n)) for n in ("1", "2", "a", "b")}
    lin = lambda u, n: u @ heads[n][0].T + heads[n][1]  # noqa: E731
    hh = rn(B, H, seed=3, scale=0.5)
    h0 = hh.clone()
    ys = []
    for t in range(T):
        bb = 1.7159 * torch.tanh(0.666 * (torch.cat([x[:, t], hh], -1) @ Wbb.T + bbb))
        g, hd = torch.tanh(lin(bb, "1")), torch.tanh(lin(bb, "2"))
        ft = lin(bb, "a") * ts[:, t, None] + lin(bb, "b")
        hh = torch.sigmoid(-ft) * g + (1 - torch.sigmoid(-ft)) * hd
        ys.append(hh)
    for layer in (ref, fast):
        y, st = layer(x=x, ts=ts, state={"h": h0})
        from .common import close
        close(y, torch.stack(ys, 1), 1e-10, f"CfC output ({layer.backend_name})", "cfc")
        close(st["h"], hh, 1e-10, f"CfC h ({layer.backend_name})", "cfc")


def test_scrn_matches_the_papers_equations():
    """Mikolov et al. 2014, Section 3, written here: s_t = (1 - alpha) B x_t + alpha s_{t-1},
    h_t = sigmoid(P s_t + A x_t + R h_{t-1}), y_t = U h_t + V s_t (before the softmax)."""
    ORACLE["scrn"] = "Mikolov et al. (2014) equations, hand loop"
    D, H, S, Y, alpha = 3, 4, 5, 6, 0.95
    ref, fast = run_both("scrn", D=D, H=H, S=S, Y=Y)
    x = rn(B, T, D, seed=1, scale=1.5)
    Bm, Am, Pm, Rm, Um, Vm = (P(ref, n) for n in ("B", "A", "P", "R", "U", "V"))
    s, h = rn(B, S, seed=2), rn(B, H, seed=3, scale=0.5)
    st0 = {"s": s.clone(), "h": h.clone()}
    ys = []
    for t in range(T):
        s = (1 - alpha) * x[:, t] @ Bm.T + alpha * s
        h = torch.sigmoid(s @ Pm.T + x[:, t] @ Am.T + h @ Rm.T)
        ys.append(h @ Um.T + s @ Vm.T)
    for layer in (ref, fast):
        y, st = layer(x=x, state=st0)
        from .common import close
        close(y, torch.stack(ys, 1), 1e-10, f"SCRN output ({layer.backend_name})", "scrn")
        close(st["s"], s, 1e-10, f"SCRN s ({layer.backend_name})", "scrn")
        close(st["h"], h, 1e-10, f"SCRN h ({layer.backend_name})", "scrn")
