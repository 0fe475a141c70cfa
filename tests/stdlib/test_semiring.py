"""stdlib/semiring (dense semiring recurrences: HMM forward, Viterbi): load + classes,
reference vs torch, and an oracle per cell: hand loops of the textbook equations (Rabiner,
1989, eqs. (19)-(21) and (32)-(35)) in probability space, float64, on a discrete-observation
HMM -- products and sums, no logsumexp or max over log values, and Viterbi's path by
backtracking. No HMM library is installed here (hmmlearn, pomegranate, torch-struct), so
none is used."""
from __future__ import annotations

import re

import pytest
import torch

import recdsl
from recdsl import plan as PL
from recdsl.lowering import DenseSemiringScan

from .common import B, T, ORACLE, close, family_cells, make

EXPECTED = {
    "hmm_forward": {"alpha": PL.SEMIRING},
    "viterbi": {"delta": PL.SEMIRING},
}
SEMIRING = {"hmm_forward": "log-sum-exp", "viterbi": "max-plus"}


def test_family_is_complete():
    assert set(family_cells("semiring")) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_and_classes(name):
    spec = recdsl.load(name)
    doc = spec.doc or ""
    assert re.search(r"\b(19|20)\d\d\b", doc) and "IEEE" in doc, f"{name}: the docstring cites no paper"
    plan = spec.plan()
    assert plan.classes() == EXPECTED[name]
    s = plan.stages[0]
    assert s.transition == "dense" and s.detail.startswith(SEMIRING[name])
    assert s.checks and all("FAILED" not in c and "NOT" not in c for c in s.checks), s.checks
    form = plan.form(0)
    assert isinstance(form, DenseSemiringScan) and form.semiring == SEMIRING[name] and form.products
    choice = plan.selections["torch"].choice(0)
    assert choice.form is form and choice.kernel.name == "torch.dense_semiring"
    # triton: the generated sequential kernel while the transition fits its registers, the
    # dense semiring kernel above (never the borrowed torch kernel)
    choice = plan.selections["triton"].choice(0)
    assert choice.kernel.name == "triton.sequential", choice.kernel.name
    big = recdsl.load(name).plan(N=128).selections["triton"].choice(0)
    assert big.kernel.name == "triton.dense_semiring" and big.kernel.borrowed is None
    assert plan.backends.get("reference") is None and plan.backends.get("torch") is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_backends_agree(name):
    from .common import check_backends
    check_backends(name)


# ---------------------------------------------------------------------------- oracles

def _hmm(N, K, seed):
    """A discrete-observation HMM: log_pi (at time 0), transitions A (row-stochastic),
    emissions E [N, K], observations o [B, T] and log b_j(o_t) [B, T, N]."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, dtype=torch.float64, generator=g)
    log_pi = torch.log_softmax(torch.randn(N, dtype=torch.float64, generator=g), 0)
    E = torch.softmax(torch.randn(N, K, dtype=torch.float64, generator=g) * 2, 1)
    o = torch.randint(0, K, (B, T), generator=g)
    logB = torch.log(E[:, o].permute(1, 2, 0))          # [B, T, N]: log b_j(o_t)
    A = torch.softmax(W, 1)                              # a_ij = softmax_j W[i, :], as the cell
    return W, log_pi, A, E, o, logB


def _layers(name, N, W, log_pi):
    layers = [make(name, backend=b, N=N) for b in ("reference", "torch")]
    for layer in layers:
        with torch.no_grad():
            layer.W_trans.copy_(W)
            layer.log_pi.copy_(log_pi)
    return layers


def rabiner_forward(pi, A, E, o):
    """Rabiner (1989) eqs. (19)-(21), probability space: alpha_1(i) = pi_i b_i(O_1),
    alpha_{t+1}(j) = [sum_i alpha_t(i) a_ij] b_j(O_{t+1}), P(O | lambda) = sum_i alpha_T(i)."""
    Bn, Tn = o.shape
    N = A.shape[0]
    alpha = torch.zeros(Bn, Tn, N, dtype=torch.float64)
    for b in range(Bn):
        for i in range(N):
            alpha[b, 0, i] = pi[i] * E[i, o[b, 0]]
        for t in range(1, Tn):
            for j in range(N):
                alpha[b, t, j] = sum(alpha[b, t - 1, i] * A[i, j] for i in range(N)) * E[j, o[b, t]]
    return alpha, alpha.sum(-1)


def test_hmm_forward_matches_rabiner():
    ORACLE["hmm_forward"] = "hand loop of Rabiner (1989) eqs. (19)-(21), probability space"
    N, K = 4, 5
    W, log_pi, A, E, o, logB = _hmm(N, K, seed=3)
    pi = torch.exp(log_pi) @ A                   # the cell's log_pi is one transition before O_1
    alpha, likelihood = rabiner_forward(pi, A, E, o)
    for layer in _layers("hmm_forward", N, W, log_pi):
        (log_alpha, loglik), st = layer(logB=logB)
        close(log_alpha, torch.log(alpha), 1e-10, f"hmm_forward log alpha ({layer.backend_name})", "hmm_forward")
        close(loglik, torch.log(likelihood), 1e-10, f"hmm_forward log-likelihood ({layer.backend_name})",
              "hmm_forward")
        close(st["alpha"], torch.log(alpha[:, -1]), 1e-10, "hmm_forward state", "hmm_forward")


def test_hmm_forward_gradients_are_posteriors():
    """d log P(O) / d log b_j(o_t) is the state posterior gamma_t(j) = alpha_t(j) beta_t(j) / P(O)
    (Rabiner eq. (27)), with beta from eqs. (24)-(25) in probability space."""
    N, K = 3, 4
    W, log_pi, A, E, o, logB = _hmm(N, K, seed=5)
    pi = torch.exp(log_pi) @ A
    alpha, likelihood = rabiner_forward(pi, A, E, o)
    beta = torch.ones_like(alpha)
    for t in range(T - 2, -1, -1):
        for i in range(N):
            beta[:, t, i] = sum(A[i, j] * E[j, o[:, t + 1]] * beta[:, t + 1, j] for j in range(N))
    gamma = alpha * beta / likelihood[:, -1, None, None]
    for layer in _layers("hmm_forward", N, W, log_pi):
        x = logB.clone().requires_grad_()
        (_, loglik), _ = layer(logB=x)
        (g,) = torch.autograd.grad(loglik[:, -1].sum(), x)
        close(g, gamma, 1e-10, f"hmm_forward posteriors ({layer.backend_name})", "hmm_forward")


def rabiner_viterbi(pi, A, E, o):
    """Rabiner (1989) eqs. (32)-(35), probability space: delta_1(i) = pi_i b_i(O_1),
    delta_t(j) = max_i [delta_{t-1}(i) a_ij] b_j(O_t), psi_t(j) its argmax; P* = max_i delta_T(i),
    q*_T its argmax, q*_t = psi_{t+1}(q*_{t+1})."""
    Bn, Tn = o.shape
    N = A.shape[0]
    delta = torch.zeros(Bn, Tn, N, dtype=torch.float64)
    psi = torch.zeros(Bn, Tn, N, dtype=torch.long)
    paths = torch.zeros(Bn, Tn, dtype=torch.long)
    for b in range(Bn):
        for i in range(N):
            delta[b, 0, i] = pi[i] * E[i, o[b, 0]]
        for t in range(1, Tn):
            for j in range(N):
                cands = [float(delta[b, t - 1, i] * A[i, j]) for i in range(N)]
                best = max(range(N), key=lambda i: cands[i])
                psi[b, t, j] = best
                delta[b, t, j] = cands[best] * E[j, o[b, t]]
        paths[b, -1] = max(range(N), key=lambda i: float(delta[b, -1, i]))
        for t in range(Tn - 2, -1, -1):
            paths[b, t] = psi[b, t + 1, paths[b, t + 1]]
    return delta, delta[:, -1].max(-1).values, paths


def test_viterbi_matches_rabiner():
    ORACLE["viterbi"] = "hand loop of Rabiner (1989) eqs. (32)-(35), probability space, with backtracking"
    N, K = 4, 5
    W, log_pi, A, E, o, logB = _hmm(N, K, seed=7)
    # the cell's log_pi is one transition before O_1: the best way into state j at O_1 is Rabiner's pi_j
    pi = (torch.exp(log_pi)[:, None] * A).amax(0)
    delta, pstar, paths = rabiner_viterbi(pi, A, E, o)
    # the backtracked path's own probability is P*
    for b in range(B):
        q = paths[b]
        p = pi[q[0]] * E[q[0], o[b, 0]]
        for t in range(1, T):
            p = p * A[q[t - 1], q[t]] * E[q[t], o[b, t]]
        assert abs(float(torch.log(p) - torch.log(pstar[b]))) < 1e-12
    for layer in _layers("viterbi", N, W, log_pi):
        x = logB.clone().requires_grad_()
        (log_delta, best), st = layer(logB=x)
        close(log_delta, torch.log(delta), 1e-10, f"viterbi log delta ({layer.backend_name})", "viterbi")
        close(best[:, -1], torch.log(pstar), 1e-10, f"viterbi best ({layer.backend_name})", "viterbi")
        close(st["delta"], torch.log(delta[:, -1]), 1e-10, "viterbi state", "viterbi")
        # the subgradient of the best score with respect to the emissions is the best path's indicator
        (g,) = torch.autograd.grad(best[:, -1].sum(), x)
        close(g, torch.nn.functional.one_hot(paths, N).double(), 0.0, f"viterbi path ({layer.backend_name})",
              "viterbi")
