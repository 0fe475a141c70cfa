"""Small runtime helpers the generated torch code calls (kept out of the generated text)."""
from __future__ import annotations

import torch


def with_prefix(t: torch.Tensor, nb: int) -> torch.Tensor:
    """t with nb leading axes of size 1, so it broadcasts against prefixed tensors."""
    return t.reshape((1,) * nb + tuple(t.shape))


def broadcast_prefix(xs: list[torch.Tensor], nb: int) -> list[torch.Tensor]:
    """Expand the prefix axes of xs to a common shape (torch.cat does not broadcast)."""
    prefix = torch.broadcast_shapes(*(tuple(x.shape[:nb]) for x in xs))
    return [x.expand(prefix + tuple(x.shape[nb:])) for x in xs]


def param_matvec(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W @ x for a param W [m, n] (or [heads, m, n]) and x [..., (heads,) n] as one GEMM,
    instead of a batched matmul that would expand W over the batch (F.linear: no W.T view
    made at every call, as a per-step loop would)."""
    if W.dim() == 2:
        return torch.nn.functional.linear(x, W)
    return torch.einsum("...hn,hmn->...hm", x, W)


def param_linear(W: torch.Tensor, x: torch.Tensor, *biases: torch.Tensor, linear=None) -> torch.Tensor:
    """W @ x + sum(biases) for params W [m, n] (or [heads, m, n]) as one fused GEMM
    (`linear`: the function with F.linear's signature that runs a shared W; F.linear)."""
    b = biases[0]
    for other in biases[1:]:
        b = b + other
    if W.dim() == 2:
        return (linear or torch.nn.functional.linear)(x, W, b)
    return torch.einsum("...hn,hmn->...hm", x, W) + b


def expand_to(x: torch.Tensor, rank: int, shape: tuple) -> torch.Tensor:
    """Broadcast a value of `rank` node axes to the node shape `shape` (prefix kept)."""
    k = len(shape) - rank
    x = x[(Ellipsis,) + (None,) * k + (slice(None),) * rank] if k > 0 else x
    return x.expand(tuple(x.shape[:x.dim() - len(shape)]) + tuple(shape))
