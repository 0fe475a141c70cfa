"""Double backward for the backends' custom autograd Functions.

A Function whose backward launches a hand-derived adjoint (a C scan, a Triton kernel, a
reverse loop of detached per-step VJPs) returns gradients that carry no graph: with
`create_graph=True` (gradient penalties, MAML, Hessian-vector products) the second
derivative would silently be wrong -- missing terms, or None for a param. So when the
backward runs with grad mode on (create_graph=True), each Function instead re-runs its
forward with a differentiable torch formulation of the same computation (a doubling
scan, the per-step loop, the IR evaluated by torch ops) on the saved inputs and returns
`torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=True)`: the first
derivative is then autograd's, and the second is derived from it like any other.

A Function with no such formulation raises `DoubleBackwardError` naming the kernel and
the stage instead of returning a wrong number."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class DoubleBackwardError(RuntimeError):
    pass


def wants_graph(inputs: Sequence, grads: Sequence) -> bool:
    """Backward runs under create_graph=True and its result can carry a graph: an input
    or an incoming gradient requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in list(inputs) + list(grads))


def unsupported(kernel: str, stage: str, hint: str = "") -> DoubleBackwardError:
    return DoubleBackwardError(f"double backward through {kernel} of stage {stage} is not supported"
                               + (f"; {hint}" if hint else ""))


def recompute_vjp(fn: Callable, inputs: Sequence, needs: Sequence[bool], grads: Sequence) -> list:
    """The vector-Jacobian product of fn at `inputs` with a graph (for create_graph=True).

    fn(*inputs) -> outputs (a tuple of tensors, computed with differentiable torch ops)
    inputs: the Function's saved inputs (tensors with their autograd history, or others)
    needs: per input, whether its gradient is wanted (ctx.needs_input_grad)
    grads: per output, its incoming gradient (None: none)
    Returns per input its gradient (None where not needed or not reached).

    Each needed input enters the recomputation through its own alias (a view), so an input
    passed twice gets its own share of the gradient, and the result stays connected to
    the input's history (a second derivative reaches the leaves)."""
    with torch.enable_grad():
        ins = [x.view_as(x) if (need and isinstance(x, torch.Tensor)) else x for x, need in zip(inputs, needs)]
        outs = fn(*ins)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = [x for x, need in zip(ins, needs) if need and isinstance(x, torch.Tensor)]
        if not pairs or not wrt:
            got = [None] * len(wrt)
        else:
            got = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                           create_graph=True, allow_unused=True))
    it = iter(got)
    return [next(it) if need and isinstance(x, torch.Tensor) else None for x, need in zip(inputs, needs)]
