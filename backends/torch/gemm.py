"""The large GEMMs of the torch backend on CPU through oneDNN.

torch's CPU matmul calls MKL, which takes its AVX2 code on AMD processors; oneDNN (the
library behind torch.nn.LSTM) takes AVX-512 where the processor has it. Measured here
(AMD EPYC with AVX-512, 2 threads, [4096, 256] x [256, 1024] fp32): oneDNN 2.1x MKL for
x @ W^T, 1.6x for g @ W, 1.3x for g^T @ x. A recurrent layer's training step is mostly
these three GEMMs (input projection, its two gradients, the recurrent weight's gradient),
so they decide whether it keeps up with torch.nn.LSTM.

oneDNN is reached through torch's own op (`torch.ops.mkldnn._linear_pointwise`, the one
torch.compile's CPU backend calls). It is probed once: where it is missing or disagrees
with torch's matmul, or RECDSL_ONEDNN=0, everything here is torch's matmul."""
from __future__ import annotations

import os

import torch

from . import cpu_kernels
from .double_backward import recompute_vjp, wants_graph

_ONEDNN: bool | None = None


def onednn() -> bool:
    """oneDNN's linear is available and agrees with torch's matmul (probed once)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("RECDSL_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                x, w = torch.randn(5, 7), torch.randn(3, 7)
                got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                _ONEDNN = bool(torch.allclose(got, x @ w.T, atol=1e-5))
            except (RuntimeError, AttributeError, NotImplementedError):
                _ONEDNN = False
    return _ONEDNN


def _fast(*ts: torch.Tensor) -> bool:
    """oneDNN takes the call: CPU, float32, 2-D, big enough to pay for its setup."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 2 for t in ts)
            and ts[0].shape[0] * ts[1].shape[0] >= 1 << 16 and onednn())


def mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias) for a [M, K], b [N, K] (any strides)."""
    if _fast(a, b):
        # dense operands: a strided one (a column slice W[:, :D]) sends oneDNN down a path
        # 10x slower than the copy
        return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(), bias, "none", [], "")
    out = a @ b.T
    return out + bias if bias is not None else out


def tn(a: torch.Tensor, b: torch.Tensor, share: bool = False) -> torch.Tensor:
    """a^T @ b for a [N, M], b [N, K]: a weight gradient summed over N rows (N = B·T). oneDNN
    wants N at stride 1 in both operands; the C library's tiled transpose makes them twice as
    fast as torch's strided copy (the copies were a fifth of an LSTM's training step).
    share=True (inside a backward pass): a's transpose is kept for the rest of the pass, for
    another weight gradient of the same adjoint (an LSTM's dW_hh and dW_ih)."""
    if _fast(a.T, b.T) and a.stride(1) == 1 and b.stride(1) == 1 and cpu_kernels.available():
        return mm_t(_transposed(a, share), _transposed(b, False))
    return mm_t(a.T, b.T)


# Transposes kept for one backward pass: (address, shape, strides, dtype, version) -> (the
# source, kept alive so that its memory is not reused while the entry exists; its transpose).
# Views share their base's version counter: an in-place change in between (autograd adding
# another gradient into the buffer) is a different key. Cleared when the pass ends.
_PASS: dict = {}


def _transposed(a: torch.Tensor, share: bool) -> torch.Tensor:
    key = (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a._version)
    hit = _PASS.get(key)
    if hit is not None:
        return hit[1]
    out = cpu_kernels.transposed(a)
    if share:
        try:
            if not _PASS:
                torch.autograd.Variable._execution_engine.queue_callback(_PASS.clear)
            _PASS[key] = (a, out)
        except RuntimeError:   # not inside a backward pass: nothing to share with
            pass
    return out


class _Linear(torch.autograd.Function):
    """x @ W^T + b with oneDNN GEMMs forward and backward (x: [N, K], W: [M, K])."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x, W, b)
        return mm_t(x, W, b)

    @staticmethod
    def backward(ctx, g):
        x, W, b = ctx.saved_tensors
        if wants_graph([x, W, b], [g]):   # create_graph=True: autograd's formulas, with a graph
            return tuple(recompute_vjp(torch.nn.functional.linear, [x, W, b], ctx.needs_input_grad, [g]))
        need_x, need_w, need_b = ctx.needs_input_grad
        return (mm_t(g, W.T) if need_x else None, tn(g, x) if need_w else None,
                g.sum(0) if need_b else None)


def linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear(x, W, b) for x [..., K], W [M, K], with oneDNN's GEMMs on
    CPU float32 (forward and backward) where they pay."""
    flat = x.reshape(-1, x.shape[-1])
    if not _fast(flat, W):
        return torch.nn.functional.linear(x, W, b)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W, b))
    out = _Linear.apply(flat, W, b) if grad else mm_t(flat, W, b)   # inference: no autograd node
    return out.view(tuple(x.shape[:-1]) + (W.shape[0],))
