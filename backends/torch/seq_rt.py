"""Helpers the torch backend's generated code calls for whole-sequence tensors.

Sequence tensors carry NS = NB + 1 prefix axes: [B, T] or [B, T, heads]; values that do
not vary over some prefix axis keep size 1 there until a kernel needs them full."""
from __future__ import annotations

import torch

from recdsl.torch_rt import broadcast_prefix, expand_to, param_linear, param_matvec, with_prefix  # noqa: F401  (used by generated code)


def lift(x: torch.Tensor, r_from: int, r_to: int) -> torch.Tensor:
    """Insert r_to - r_from node axes right after the prefix (numpy broadcasting of node shapes)."""
    k = r_to - r_from
    if k <= 0:
        return x
    return x[(Ellipsis,) + (None,) * k + (slice(None),) * r_from]


def full_seq(x: torch.Tensor, X0: torch.Tensor, ns: int, rank: int) -> torch.Tensor:
    """x with its prefix expanded to the inputs' [B, T, (heads)] and `rank` node axes."""
    x = lift(x, x.dim() - ns, rank) if x.dim() - ns < rank else x
    while x.dim() < ns + rank:
        x = x[None]
    return x.expand(tuple(X0.shape[:ns]) + tuple(x.shape[ns:]))


def shift(seq: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """The previous value at every step: [s0, seq_0, ..., seq_{T-2}]."""
    first = s0[:, None].to(seq.dtype)
    rest = seq[:, :-1]
    tail = torch.broadcast_shapes(first.shape[2:], rest.shape[2:])
    B = max(first.shape[0], rest.shape[0])
    first = first.expand((B, 1) + tuple(tail))
    rest = rest.expand((B, rest.shape[1]) + tuple(tail))
    return torch.cat([first, rest], 1)


def at(seq: torch.Tensor, t: int, ns: int) -> torch.Tensor:
    """Step t of a sequence value (a value constant over time has a T axis of size 1)."""
    return seq[:, t] if seq.shape[1] > 1 else seq[:, 0]


def stack_t(acc: list[torch.Tensor], s0: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(a.shape for a in acc))
    return torch.stack([a.expand(shape) for a in acc], 1)


def to_bt(x: torch.Tensor, rank: int, X0: torch.Tensor, ns: int) -> torch.Tensor:
    """[B, T, (H), *node] -> [B*H, T, *node] (heads folded into the batch), contiguous."""
    x = full_seq(x, X0, ns, rank)
    if ns == 3:
        B, T, H = x.shape[:3]
        x = x.transpose(1, 2).reshape((B * H, T) + tuple(x.shape[3:]))
    return x.contiguous()


def to_b(s0: torch.Tensor, nb: int) -> torch.Tensor:
    return s0.reshape((-1,) + tuple(s0.shape[nb:])) if nb == 2 else s0


def from_bt(o: torch.Tensor, X0: torch.Tensor, ns: int) -> torch.Tensor:
    if ns == 3:
        B, T, H = X0.shape[:3]
        return o.reshape((B, H, T) + tuple(o.shape[2:])).transpose(1, 2)
    return o


def from_b(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(like.shape)
