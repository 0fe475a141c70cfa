"""What the triton backend's generated forward calls: launches of the generated kernels,
wrapped in `torch.autograd.Function`s whose backward launches the derived backward kernel.

Tensors arrive as the torch backend's whole-sequence values ([B, T, (heads,) *shape],
size-1 axes where a value does not vary); each leaf is expanded (a view, stride 0 where it
broadcasts) to the stage's [B, T, channels] and read in place by its strides. Gradients
come back per element of that view; autograd's expand backward sums them to the leaf's
own shape."""
from __future__ import annotations

import os
import sys

import torch

from ..torch.seq_rt import lift


def import_triton():
    """Triton, in its interpreter when there is no GPU. The interpreter must be chosen before
    triton is first imported (its standard library is decorated at import), so the backend
    sets TRITON_INTERPRET=1 then, and refuses CPU tensors if triton came up compiled."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
    return triton


def interpreting() -> bool:
    return bool(import_triton().knobs.runtime.interpret)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class Blocks:
    """Tile sizes: a planner choice. On a GPU, 32 steps x 64 channels per program (4 warps;
    no spills at the stdlib's sizes, see tests/triton); in the interpreter, where each tile
    op is one numpy call, longer chunks cost less."""

    @staticmethod
    def scan(C: int, T: int, device) -> tuple[int, int]:
        if device.type == "cuda":
            return 32, min(64, _pow2(C))
        return min(64, _pow2(T)), min(64, _pow2(C))


def _acc(dtype):
    tl = import_triton().language
    return tl.float64 if dtype == torch.float64 else tl.float32


def _channels(full: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A [B, T, *chan] view as [B, T, C0, C1, C2] (more than three channel axes: merged,
    which copies only when the strides do not allow a view)."""
    B, T = full.shape[:2]
    chan = tuple(full.shape[2:])
    while len(chan) > 3:
        full = full.reshape(B, T, *chan[:-2], chan[-2] * chan[-1])
        chan = tuple(full.shape[2:])
    chan = (1,) * (3 - len(chan)) + chan
    return full.reshape(B, T, *chan) if full.dim() != 5 else full, chan


def _leaf_args(leaves):
    args = []
    for x in leaves:
        args += [x, x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)]
    return args


class ScanStage:
    """Runtime handle of one generated scan stage (kernels bound after the module is built)."""

    def __init__(self, kernel):
        self.name = kernel.spec.name
        self.k = kernel.spec.k
        self.kernel = kernel
        self.fwd = self.bwd = None

    def bind(self, ns: dict):
        self.fwd, self.bwd = ns[f"{self.name}_fwd"], ns[f"{self.name}_bwd"]


def scan(stage: ScanStage, leaves: list, h0s: list, X0: torch.Tensor, ns: int, shape: tuple):
    """Run one scan stage: returns ([state sequences], [final states])."""
    B, T = X0.shape[:2]
    chan = tuple(X0.shape[2:ns]) + tuple(shape)
    full = []
    for x in leaves:
        if not torch.is_tensor(x):
            x = torch.tensor(float(x), dtype=h0s[0].dtype, device=X0.device)
        if x.dtype == torch.bool:
            x = x.to(h0s[0].dtype)
        x = lift(x, x.dim() - ns, len(shape)) if x.dim() - ns < len(shape) else x
        while x.dim() < 2 + len(chan):
            x = x[None]
        full.append(_channels(x.expand((B, T) + chan))[0])
    dt = h0s[0].dtype
    h0 = torch.stack([h.to(dt).expand((B,) + chan).reshape(B, -1) for h in h0s], -1)
    seq, fin = _ScanFn.apply(stage, chan, h0, *full)
    seqs = [seq[..., i].reshape((B, T) + chan) for i in range(stage.k)]
    fins = [fin[..., i].reshape((B,) + chan) for i in range(stage.k)]
    return seqs, fins


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage, chan, h0, *leaves):
        B, C, k = h0.shape
        T = leaves[0].shape[1] if leaves else 1
        _, (C0, C1, C2) = _channels(torch.empty((1, 1) + chan, device="meta"))
        h0 = h0.contiguous()
        hseq = torch.empty((B, T, C, k), dtype=h0.dtype, device=h0.device)
        hfin = torch.empty((B, C, k), dtype=h0.dtype, device=h0.device)
        BT, BC = Blocks.scan(C, T, h0.device)
        grid = (triton_cdiv(C, BC), B)
        stage.fwd[grid](*_leaf_args(leaves), h0, hseq, hfin, T, C, C1, C2,
                        ACC=_acc(h0.dtype), BLOCK_T=BT, BLOCK_C=BC, STORE_SEQ=True)
        ctx.stage, ctx.dims = stage, (B, T, C, C1, C2)
        ctx.save_for_backward(h0, hseq, *leaves)
        return hseq, hfin

    @staticmethod
    def backward(ctx, dhseq, dhfin):
        stage = ctx.stage
        B, T, C, C1, C2 = ctx.dims
        h0, hseq, *leaves = ctx.saved_tensors
        grads = [torch.empty((B, T, C), dtype=h0.dtype, device=h0.device) for _ in leaves]
        dh0 = torch.empty_like(h0)
        has_dseq = dhseq is not None
        dhseq = dhseq.contiguous() if has_dseq else hseq
        dhfin = dhfin.contiguous() if dhfin is not None else torch.zeros_like(h0)
        BT, BC = Blocks.scan(C, T, h0.device)
        grid = (triton_cdiv(C, BC), B)
        stage.bwd[grid](*_leaf_args(leaves), *grads, h0, hseq, dhseq, dhfin, dh0, T, C, C1, C2,
                        ACC=_acc(h0.dtype), BLOCK_T=BT, BLOCK_C=BC, HAS_DSEQ=has_dseq)
        return (None, None, dh0) + tuple(g.view(x.shape) for g, x in zip(grads, leaves))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
