"""The parallel Newton solve of one nonlinear stage (MATH.md §5; DEER, Lim et al. 2024;
ParaRNN, Danieli et al. 2025; damping as in ELK, Gonzalez et al. 2024).

Unknown: the trajectory h_1..h_T of the stage's k states. With f the step (`core`) and
J_t = d f / d h_{t-1} its Jacobian (`jac`: diagonal, or k x k per element), one iteration
is, for all t at once,

    r_t  = f(h_{t-1}, x_t) - h_t                     (the residual; h_0 is the initial state)
    d_t  = J_t d_{t-1} + r_t,   d_0 = 0             (the linearised step: one scan)
    h   <- h + d

from h_t = f(h_0 or 0, x_t) (every step's previous state taken as 0, the first as h_0).
It stops when max|r| <= tol * max(1, max|h|). Any J gives h_1..h_n exact after n full
steps (d_t = r_t once the steps before t are exact), so damping shrinks the linearisation
(a trust region: J clipped and scaled towards 0, the Picard step) rather than the step
(NewtonOptions.damping). A non-finite residual or `max_iters` iterations without
convergence raise a RecError naming the cell, the stage and the iteration: NaNs are never
returned.

Backward at the solution: l_t = g_t + J_{t+1}^T l_{t+1} (one reverse scan of the same kind,
transposed blocks), then the gradients of the inputs, params and initial state from one
vectorised VJP of the step over all (h_{t-1}, x_t) with cotangents l_t."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from recdsl.errors import RecError

from ..torch import scans

DAMPING = ("auto", "none")
# damping="auto": the full Newton step unless its residual is not finite or grows past GROWTH x
# max(residual, 1); then the same iteration again with the Jacobian clipped to [-1, 1] and
# scaled by each of these in turn (None: as computed; 0: a Picard step, h_t <- f(h_{t-1}, x_t)).
TRUST = (None, 1.0, 0.5, 0.25, 0.0)
GROWTH = 1e4


@dataclass
class NewtonOptions:
    """How the newton backend solves (layer.newton_options; change its fields between calls).

    max_iters  Newton iterations at most (each: one vectorised step with its Jacobian + one scan)
    tol        stop when max|f(h_{t-1}, x_t) - h_t| <= tol * max(1, max|h|); None: 1e-10 in
               float64, 1e-5 in float32
    damping    "auto": the full Newton step, unless its residual is not finite or grows more
               than 1e4-fold: then a trust-region step instead (the Jacobian clipped to [-1, 1]
               and scaled by 1, 1/2, 1/4, then 0 -- a Picard step), each step still a whole
               update, so that after n iterations the first n steps are exact (ELK's idea:
               shrink the linearisation, not the step);
               "none": full Newton steps always;
               a number w in (0, 1]: every Newton step scaled by w (relaxation; slower)"""
    max_iters: int = 100
    tol: float | None = None
    damping: str | float = "auto"

    def check(self) -> None:
        if not (isinstance(self.max_iters, int) and self.max_iters >= 1):
            raise RecError(f"newton_options.max_iters must be a positive integer, got {self.max_iters!r}")
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise RecError(f"newton_options.tol must be a positive number or None, got {self.tol!r}")
        d = self.damping
        if not (d in DAMPING or (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 1)):
            raise RecError(f"newton_options.damping must be 'auto', 'none' or a number in (0, 1], got {d!r}")


@dataclass
class SolveReport:
    """One stage's solve in the last forward (layer.last_solve)."""
    stage: int
    states: tuple
    iterations: int           # Newton updates made (0: the warm start already met tol)
    residual: float           # max|f(h_{t-1}, x_t) - h_t| at the returned trajectory
    tol: float                # the tolerance it met (absolute: tol * max(1, max|h|))
    damped: int = 0           # iterations whose full Newton step was replaced by a trust-region one
    evaluations: int = 0      # vectorised evaluations of the step with its Jacobian (besides the warm start's)


class Stage:
    """What the generated forward hands the solver about one Newton stage."""

    def __init__(self, cell: str, index: int, states: tuple, program):
        self.cell, self.index, self.states, self.program = cell, index, states, program

    def fail(self, what: str, iteration: int):
        raise RecError(f"newton backend: cell {self.cell}, stage {self.index} ({', '.join(self.states)}): {what} at "
                       f"iteration {iteration}",
                       hint="Newton's method converges for contractive cells (|d h'/d h| < 1 along the trajectory); "
                            "use backend='torch' for this cell or these inputs, or change layer.newton_options "
                            "(damping, max_iters, tol)")


def _flat(x, B: int, T: int):
    """A whole-sequence value [B, T, ...] (or broadcast: size 1 there) as [B*T, ...]."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() < 2:
        return x
    if x.shape[0] == B and x.shape[1] == T:
        return x.reshape((B * T,) + tuple(x.shape[2:]))
    if x.shape[0] == 1 and x.shape[1] == 1:
        return x[0]
    return x.expand((B, T) + tuple(x.shape[2:])).reshape((B * T,) + tuple(x.shape[2:]))


def _prev(h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_{t-1} for every t: the initial state, then h_1..h_{T-1}; [B*T, ...]."""
    B, T = h.shape[:2]
    return torch.cat([h0[:, None], h[:, :-1]], 1).reshape((B * T,) + tuple(h.shape[2:]))


def _linear_solve(J: list, r: list, h0s: list, k: int) -> list:
    """d_t = J_t d_{t-1} + r_t from d_0 = h0s (the existing C scans: element, or k x k block)."""
    if k == 1:
        return [scans.element_scan("diag", J[0], r[0], h0s[0])]
    rows = [[J[i * k + j] for j in range(k)] for i in range(k)]
    return scans.block_scan(rows, r, h0s)


def _evaluate(jac, ins_f, hs, h0s, params, step_params, B, T, shape_of):
    out = jac(ins_f, [_prev(h, h0) for h, h0 in zip(hs, h0s)], params, step_params)
    k = len(hs)
    flat = [(B * T,) + tuple(s[2:]) for s in shape_of]
    f = [o.expand(flat[i]).reshape(shape_of[i]) for i, o in enumerate(out[:k])]
    J = [None if j is None else j.expand(flat[i // k]).reshape(shape_of[i // k]) for i, j in enumerate(out[k:])]
    return f, J


def newton_forward(stage: Stage, core, jac, ins, h0s, params, BT, opts: NewtonOptions):
    """(the state sequences, the Jacobian blocks at them, the report)."""
    opts.check()
    B, T = BT
    k = len(h0s)
    step_params = {n: p[None] for n, p in params.items()}
    ins_f = [_flat(x, B, T) for x in ins]
    dtype = h0s[0].dtype
    tol = opts.tol if opts.tol is not None else (1e-10 if dtype == torch.float64 else 1e-5)
    shape_of = [(B, T) + tuple(h0.shape[1:]) for h0 in h0s]
    # warm start: every step from a zero previous state (the first from h_0)
    zeros = [torch.zeros(s, dtype=dtype, device=h0.device) for s, h0 in zip(shape_of, h0s)]
    out = core(ins_f, [_prev(z, h0) for z, h0 in zip(zeros, h0s)], params, step_params)
    hs = [o.expand((B * T,) + tuple(s[2:])).reshape(s) for o, s in zip(out, shape_of)]
    f, J = _evaluate(jac, ins_f, hs, h0s, params, step_params, B, T, shape_of)
    evals, damped = 1, 0
    r = [fi - h for fi, h in zip(f, hs)]
    res = _max_abs(r)
    it = 0
    zero0 = [torch.zeros_like(h0) for h0 in h0s]
    hmax = _max_abs(hs)
    while True:
        if res != res or res == float("inf"):
            stage.fail(f"the residual is not finite ({res})", it)
        if res <= 100 * tol * max(1.0, hmax):   # near: max|h| afresh (a reduction less per iteration before)
            hmax = _max_abs(hs)
        bound = tol * max(1.0, hmax)
        if res <= bound:
            break
        if it >= opts.max_iters:
            stage.fail(f"no convergence in max_iters={opts.max_iters} iterations (max residual {res:.3e} > "
                       f"{bound:.1e})", it)
        it += 1
        w = 1.0 if opts.damping in DAMPING else float(opts.damping)
        scales = TRUST if opts.damping == "auto" else (None,)
        for level, scale in enumerate(scales):
            Jd = J if scale is None else [None if j is None else j.clamp(-1.0, 1.0) * scale for j in J]
            d = _linear_solve(Jd, r, zero0, k)
            h_try = [h + w * di for h, di in zip(hs, d)]
            f_try, J_try = _evaluate(jac, ins_f, h_try, h0s, params, step_params, B, T, shape_of)
            evals += 1
            r_try = [fi - h for fi, h in zip(f_try, h_try)]
            res_try = _max_abs(r_try)
            if res_try <= GROWTH * max(res, 1.0) or level == len(scales) - 1:   # finite and not exploding
                break
            damped += 1
        hs, f, J, r, res = h_try, f_try, J_try, r_try, res_try
    report = SolveReport(stage.index, stage.states, it, res, bound, damped, evals)
    return hs, J, report


def _max_abs(xs) -> float:
    return max(float(x.abs().max()) if x.numel() else 0.0 for x in xs)


class _NewtonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, core, jac, n_ins, names, BT, *tensors):
        ins, h0s, params = (list(tensors[:n_ins]), list(tensors[n_ins:n_ins + len(stage.states)]),
                            list(tensors[n_ins + len(stage.states):]))
        hs, J, report = newton_forward(stage, core, jac, ins, h0s, dict(zip(names, params)), BT, stage.program.options)
        stage.program.last_solve.append(report)
        ctx.stage, ctx.core, ctx.n_ins, ctx.names, ctx.BT = stage, core, n_ins, names, BT
        ctx.J = J
        ctx.save_for_backward(*ins, *h0s, *params, *hs)
        return tuple(hs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        k, n_ins, B, T = len(ctx.stage.states), ctx.n_ins, *ctx.BT
        saved = ctx.saved_tensors
        ins, h0s = list(saved[:n_ins]), list(saved[n_ins:n_ins + k])
        params, hs = list(saved[n_ins + k:len(saved) - k]), list(saved[len(saved) - k:])
        gs = [torch.zeros_like(h) if g is None else g for g, h in zip(gs, hs)]
        lam = adjoint(ctx.J, gs, k)
        # one vectorised VJP of the step over all (h_{t-1}, x_t) with cotangents lam
        need = ctx.needs_input_grad[6:]
        with torch.enable_grad():
            ins_l = [x.detach().requires_grad_(bool(nd)) if isinstance(x, torch.Tensor) else x
                     for x, nd in zip(ins, need[:n_ins])]
            h0_l = [h0.detach().requires_grad_(True) for h0 in h0s]
            par_l = [p.detach().requires_grad_(bool(nd)) for p, nd in zip(params, need[n_ins + k:])]
            prev = [_prev(h.detach(), h0) for h, h0 in zip(hs, h0_l)]
            stored = dict(zip(ctx.names, par_l))
            step_params = {n: p[None] for n, p in stored.items()}
            out = ctx.core([_flat(x, B, T) for x in ins_l], prev, stored, step_params)
            outs = [o.expand(prev[i].shape) if o.shape != prev[i].shape else o for i, o in enumerate(out)]
            wrt = [x for x in ins_l + h0_l + par_l if isinstance(x, torch.Tensor) and x.requires_grad]
            grads = torch.autograd.grad(outs, wrt, [l.reshape(o.shape) for l, o in zip(lam, outs)],
                                        allow_unused=True)
        it = iter(grads)
        res = []
        for x in ins_l + h0_l + par_l:
            g = next(it) if isinstance(x, torch.Tensor) and x.requires_grad else None
            res.append(torch.zeros_like(x) if g is None and isinstance(x, torch.Tensor) and x.requires_grad else g)
        return (None,) * 6 + tuple(res)


def adjoint(J: list, gs: list, k: int) -> list:
    """l_t = g_t + J_{t+1}^T l_{t+1} (l_T = g_T): the reverse scan with the transposed blocks,
    run as a forward scan over the time-flipped sequences."""
    def shifted(j):   # J_{t+1} at t, 0 at the last step; flipped in time
        if j is None:
            return None
        return torch.cat([j[:, 1:], torch.zeros_like(j[:, :1])], 1).flip(1)
    zero0 = [torch.zeros_like(g[:, 0]) for g in gs]
    gf = [g.flip(1) for g in gs]
    if k == 1:
        lam = [scans.element_scan("diag", shifted(J[0]), gf[0], zero0[0])]
    else:
        rows = [[shifted(J[j * k + i]) for j in range(k)] for i in range(k)]   # transposed: (i, j) <- J[j][i]
        lam = scans.block_scan(rows, gf, zero0)
    return [l.flip(1) for l in lam]


def solve(stage: Stage, core, jac, ins: list, h0s: list, params: dict, BT):
    """The stage's state sequences [B, T, ...] (differentiable: _NewtonFunction's backward)."""
    names = list(params)
    tensors = list(ins) + list(h0s) + [params[n] for n in names]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return list(_NewtonFunction.apply(stage, core, jac, len(ins), names, tuple(BT), *tensors))
    hs, _, report = newton_forward(stage, core, jac, list(ins), list(h0s), params, tuple(BT), stage.program.options)
    stage.program.last_solve.append(report)
    return hs
