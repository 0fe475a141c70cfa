"""Context parallelism: one sequence split along time across the ranks of a process group.

Rank r holds steps [T_0 + ... + T_{r-1}, ...) of every sequence. Its module starts from the
state rank r-1 ended with (received) and hands its final state to rank r+1; in the backward
the gradient of that state comes back from rank r+1 and rank r sends the gradient of its
initial state to rank r-1. Outputs and gradients are those of one rank running the whole
sequence (tests/pipeline/test_context_parallel.py), for every cell: the boundary is the
cell's state, which every recdsl module takes and returns.

    layer = recdsl.load("gla")(K=64, V=64, heads=4)
    cp = ContextParallel(layer)                    # torch.distributed initialised
    out, final = cp(q=q_r, k=k_r, v=v_r, gk=gk_r)  # this rank's chunk [B, T_r, ...]
    loss_r(out).backward()                         # then all-reduce the parameters' gradients

The ranks run one after the other (a state must arrive before a chunk starts): what this
buys is memory — a sequence longer than one device holds — not time. Overlap comes from
several micro-batches in flight; a linear stage could also run its chunks at once and
correct them with the carried state (not built)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ContextParallel(nn.Module):
    def __init__(self, module: nn.Module, group=None):
        super().__init__()
        self.module, self.group = module, group

    def forward(self, **inputs):
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        first = next(iter(inputs.values()))
        template = self.module.initial_state(first.shape[0], first.dtype, first.device)
        names = sorted(template)
        if rank > 0:   # the state rank - 1 ended with; its gradient goes back there
            anchor = torch.zeros((), dtype=first.dtype, device=first.device, requires_grad=torch.is_grad_enabled())
            state = dict(zip(names, _Receive.apply(anchor, _peer(rank - 1, self.group), self.group,
                                                   *[template[n] for n in names])))
        else:
            state = None
        out, final = self.module(state=state, **inputs)
        if rank < size - 1:
            outs = out if isinstance(out, tuple) else (out,)
            outs = _Send.apply(_peer(rank + 1, self.group), self.group, len(outs), *outs, *[final[n] for n in names])
            out = outs if isinstance(out, tuple) else outs[0]
        return out, final


def _peer(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _Receive(torch.autograd.Function):
    """Forward: the previous rank's final state. Backward: its gradient, sent back there."""

    @staticmethod
    def forward(ctx, anchor, src, group, *like):
        ctx.src, ctx.group = src, group
        got = [torch.empty_like(t) for t in like]
        for t in got:
            dist.recv(t, src, group=group)
        return tuple(got)

    @staticmethod
    def backward(ctx, *grads):
        for g in grads:   # materialised: an unread state part sends zeros
            dist.send(g.contiguous(), ctx.src, group=ctx.group)
        return (None, None, None) + (None,) * len(grads)


class _Send(torch.autograd.Function):
    """Forward: this rank's final state to the next rank; the outputs pass through (the
    loss reads them, so the backward runs). Backward: the final state's gradient from the
    next rank."""

    @staticmethod
    def forward(ctx, dst, group, n_out, *tensors):
        outs, final = tensors[:n_out], tensors[n_out:]
        ctx.dst, ctx.group = dst, group
        ctx.like = [(t.shape, t.dtype, t.device) for t in final]
        for t in final:
            dist.send(t.detach().contiguous(), dst, group=group)
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *g_outs):
        got = []
        for shape, dtype, device in ctx.like:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, ctx.dst, group=ctx.group)
            got.append(t)
        return (None, None, None) + tuple(g_outs) + tuple(got)
