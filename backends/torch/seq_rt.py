"""Helpers the torch backend's generated code calls for whole-sequence tensors.

Sequence tensors carry seq_prefix_rank = prefix_rank + 1 prefix axes: [B, T] or
[B, T, heads]; values that do not vary over some prefix axis keep size 1 there until a
kernel needs them full."""
from __future__ import annotations

import math

import torch

from recdsl import torch_rt
from recdsl.torch_rt import broadcast_prefix, expand_to, param_matvec, with_prefix  # noqa: F401  (used by generated code)

from . import gemm
from .double_backward import recompute_vjp, wants_graph


def param_linear(W: torch.Tensor, x: torch.Tensor, *biases: torch.Tensor) -> torch.Tensor:
    """torch_rt.param_linear, the whole-sequence projection W @ x + b over B*T: with a shared
    W its GEMMs (forward and both gradients) go to oneDNN where that pays (gemm.py)."""
    return torch_rt.param_linear(W, x, *biases, linear=gemm.linear)


def all_finite(*tensors) -> bool:
    """Whether every element of the given tensors (None and Python numbers skipped) is
    finite: one multi-tensor max-norm (a NaN or inf anywhere makes its tensor's norm
    non-finite; fused into few launches on a GPU), their sum (non-negative terms: finite
    iff every one is) and one host read for all of them -- three launches, not an
    isfinite/all pair per tensor."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    if not ts:
        return True
    norms = torch._foreach_norm(ts, float("inf"))
    total = torch.stack(norms).sum(dtype=torch.float64) if len({n.dtype for n in norms}) == 1 \
        else sum(n.double() for n in norms)
    return math.isfinite(total.item())


def lift(x: torch.Tensor, r_from: int, r_to: int) -> torch.Tensor:
    """Insert r_to - r_from node axes right after the prefix (numpy broadcasting of node shapes)."""
    k = r_to - r_from
    if k <= 0:
        return x
    return x[(Ellipsis,) + (None,) * k + (slice(None),) * r_from]


def full_seq(x: torch.Tensor, first_input: torch.Tensor, ns: int, rank: int) -> torch.Tensor:
    """x with its prefix expanded to the inputs' [B, T, (heads)] and `rank` node axes."""
    x = lift(x, x.dim() - ns, rank) if x.dim() - ns < rank else x
    while x.dim() < ns + rank:
        x = x[None]
    return x.expand(tuple(first_input.shape[:ns]) + tuple(x.shape[ns:]))


def shift(seq: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """The previous value at every step: [s0, seq_0, ..., seq_{T-2}]."""
    first = s0[:, None].to(seq.dtype)
    rest = seq[:, :-1]
    tail = torch.broadcast_shapes(first.shape[2:], rest.shape[2:])
    B = max(first.shape[0], rest.shape[0])
    first = first.expand((B, 1) + tuple(tail))
    rest = rest.expand((B, rest.shape[1]) + tuple(tail))
    return torch.cat([first, rest], 1)


def stack_t(acc: list[torch.Tensor], s0: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(a.shape for a in acc))
    return torch.stack([a.expand(shape) for a in acc], 1)


def to_bt(x: torch.Tensor, rank: int, first_input: torch.Tensor, ns: int) -> torch.Tensor:
    """[B, T, (H), *node] -> [B*H, T, *node] (heads folded into the batch), contiguous."""
    x = full_seq(x, first_input, ns, rank)
    if ns == 3:
        B, T, H = x.shape[:3]
        x = x.transpose(1, 2).reshape((B * H, T) + tuple(x.shape[3:]))
    return x.contiguous()


def to_b(s0: torch.Tensor, nb: int) -> torch.Tensor:
    return s0.reshape((-1,) + tuple(s0.shape[nb:])) if nb == 2 else s0


def from_bt(o: torch.Tensor, first_input: torch.Tensor, ns: int) -> torch.Tensor:
    if ns == 3:
        B, T, H = first_input.shape[:3]
        return o.reshape((B, H, T) + tuple(o.shape[2:])).transpose(1, 2)
    return o


def from_b(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(like.shape)


def run_loop(core, ins: list, s0: list, params: dict, T: int):
    """Run a sequential stage's core over time: core(inputs at t, states, params,
    step_params) -> new states, for params the params the core reads (as stored). Returns
    the state sequences [B, T, ...]. Whatever does not change over time is set up once per
    loop, not per step: the params' views (step_params: one leading axis) and the inputs'
    per-step views (one unbind).
    With gradients, a custom backward walks time in reverse, recomputing one step at a
    time to get its vector-Jacobian product, so memory is the states, not a graph per
    step. Under create_graph=True the backward re-runs the loop with autograd instead
    (double_backward.py): second derivatives are autograd's."""
    names = list(params)
    values = [params[n] for n in names]
    if torch.is_grad_enabled() and any(t.requires_grad for t in list(ins) + s0 + values):
        return _LoopFunction.apply(core, names, len(ins), len(s0), T, *ins, *s0, *values)
    return _forward_loop(core, names, ins, s0, values, T)


def _param_views(names: list, params: list) -> tuple[dict, dict]:
    """(params, step_params): the params as stored and with one leading axis (per-step
    tensors have one prefix axis more), made once per loop; every step reads them."""
    stored = dict(zip(names, params))
    return stored, {n: p[None] for n, p in stored.items()}


def _steps(ins: list, T: int) -> list[tuple]:
    """Per step t, the inputs' values at t: a sequence [B, T, ...] unbound along time once
    (T views in one call, not T indexing ops per input), a value constant over time (a T
    axis of size 1) the same view at every step."""
    per_input = [x.unbind(1) if x.shape[1] > 1 else (x[:, 0],) * T for x in ins]
    return list(zip(*per_input)) if per_input else [()] * T


def _fit(out, prev: list) -> list:
    """The core's new states at the shape of the previous ones (a value that does not vary
    over a prefix axis comes back with size 1 there)."""
    return [o.expand_as(s) if o.shape != s.shape else o for o, s in zip(out, prev)]


def _forward_loop(core, names, ins, s0, params, T):
    stored, step_params = _param_views(names, params)
    st, seqs = list(s0), [[] for _ in s0]
    for x_t in _steps(ins, T):
        st = _fit(core(x_t, st, stored, step_params), st)
        for acc, s in zip(seqs, st):
            acc.append(s)
    return tuple(torch.stack(acc, 1) for acc in seqs)


class _LoopFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core, names, n_in, n_s, T, *tensors):
        ins, s0, params = list(tensors[:n_in]), list(tensors[n_in:n_in + n_s]), list(tensors[n_in + n_s:])
        with torch.no_grad():
            seqs = _forward_loop(core, names, ins, s0, params, T)
        ctx.core, ctx.names, ctx.n_in, ctx.n_s, ctx.T = core, names, n_in, n_s, T
        ctx.save_for_backward(*ins, *s0, *params, *seqs)
        return seqs

    @staticmethod
    def backward(ctx, *g_seqs):
        saved = ctx.saved_tensors
        n_in, n_s = ctx.n_in, ctx.n_s
        ins, s0 = list(saved[:n_in]), list(saved[n_in:n_in + n_s])
        n_p = len(saved) - n_in - 2 * n_s
        params = list(saved[n_in + n_s:n_in + n_s + n_p])
        seqs = list(saved[n_in + n_s + n_p:])
        inputs = ins + s0 + params
        if wants_graph(inputs, g_seqs):
            # create_graph=True: the per-step VJPs below are taken on detached copies (no
            # graph to the inputs' history), so re-run the loop differentiably instead
            def loop(*xs):
                return _forward_loop(ctx.core, ctx.names, list(xs[:n_in]), list(xs[n_in:n_in + n_s]),
                                     list(xs[n_in + n_s:]), ctx.T)
            return (None,) * 5 + tuple(recompute_vjp(loop, inputs, ctx.needs_input_grad[5:], g_seqs))
        leaves_p = [p.detach().requires_grad_(p.requires_grad) for p in params]
        with torch.enable_grad():   # the views carry the graph back to the leaves at every step
            stored, step_params = _param_views(ctx.names, leaves_p)
        steps = _steps([x.detach() for x in ins], ctx.T)
        g_in = [torch.zeros_like(x) for x in ins]
        g_p = [torch.zeros_like(p) for p in params]
        lam = [torch.zeros_like(s[:, -1]) for s in seqs]
        for t in range(ctx.T - 1, -1, -1):
            lam = [l + g[:, t] if g is not None else l for l, g in zip(lam, g_seqs)]
            prev = [(s0[i] if t == 0 else seqs[i][:, t - 1]).detach().requires_grad_() for i in range(n_s)]
            x_t = [v.detach().requires_grad_(x.requires_grad) for v, x in zip(steps[t], ins)]
            with torch.enable_grad():
                out = _fit(ctx.core(x_t, prev, stored, step_params), prev)
                wrt = prev + [x for x in x_t if x.requires_grad] + [p for p in leaves_p if p.requires_grad]
                grads = torch.autograd.grad(out, wrt, grad_outputs=lam, allow_unused=True)
            it = iter(grads)
            lam = [g if g is not None else torch.zeros_like(p) for g, p in zip([next(it) for _ in prev], prev)]
            for j, x in enumerate(x_t):
                if x.requires_grad:
                    g = next(it)
                    if g is not None:
                        idx = t if ins[j].shape[1] > 1 else 0
                        g_in[j][:, idx] += g.expand_as(g_in[j][:, idx]) if g.shape != g_in[j][:, idx].shape else g
            for j, p in enumerate(leaves_p):
                if p.requires_grad:
                    g = next(it)
                    if g is not None:
                        g_p[j] += g
        g_s0 = [l if s.requires_grad else None for l, s in zip(lam, s0)]
        return (None,) * 5 + tuple(g if x.requires_grad else None for g, x in zip(g_in, ins)) + tuple(g_s0) + \
            tuple(g if p.requires_grad else None for g, p in zip(g_p, params))
