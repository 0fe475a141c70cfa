"""Torch twins of the generated Triton stages, for double backward.

A stage kernel's backward is derived by hand (texpr.vjp, the adjoint scan): it returns
numbers, not a graph, so a second derivative through it (create_graph=True) would be
silently wrong. The launch Functions (launch._ScanFn, launch._SeqFn) then re-run the
stage with its twin -- the same computation, from the same IR, in differentiable torch
ops -- and take autograd's derivative of that (backends/torch/double_backward.py).

A twin has the Function's own signature and layouts, so it reads the tensors the Function
saved:
  scan  (h0 [NB, C, k], leaves [B, T, C0, C1, C2], readout leaves [B, T, ...]) ->
        (state sequences [B, T, C, k], final states [NB, C, k], outputs [B, T, C],
         reduced outputs [B, T, C / N]): the prologue (the coefficients from the leaves,
         elementwise), the scan (the doubling scans of backends/torch/scans.py), the
         epilogue (outputs elementwise in the new states, readouts h' @ q reduced over N).
  seq   (h0 [NB, NH, n] per state, leaves [B, T, NH, n], params as stored) ->
        (state sequences [B, T, NH, n], final states [NB, NH, n]): the stage's core, one
        step at a time, emitted by torch_expr (the torch backend's meaning of each op).
Reverse runs each sequence right to left; cu_seqlens runs each packed sequence from its
own initial state (the kernels' indexing, done here by slicing)."""
from __future__ import annotations

import operator
import weakref

import torch
import torch.nn.functional as F

from recdsl.ir import Op
from recdsl.torch_expr import FUNC2, UNARY_TORCH, compile_nodes

from ..torch import scans
from ..torch.double_backward import unsupported
from . import texpr
from .fusion import resolve



def _torch_fn(text: str):
    """'torch.exp' / 'F.softplus' (torch_expr's tables, the torch backend's meaning of an op)
    -> the function."""
    mod, fn = text.split(".")
    return getattr({"torch": torch, "F": F}[mod], fn)


_UNARY = {op: _torch_fn(text) for op, text in UNARY_TORCH.items()}
_UNARY[Op.NEG] = torch.neg
_BINARY = {Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul, Op.DIV: operator.truediv,
           Op.POW: torch.pow, Op.LT: torch.lt, Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge, Op.EQ: torch.eq,
           Op.NE: torch.ne}
_BINARY.update({op: _torch_fn(text) for op, text in FUNC2.items()})

_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _twin(kern, cls):
    """The kernel's twin, built once; a kernel with no torch form raises DoubleBackwardError
    naming it and its stage (never a silently wrong second derivative)."""
    if kern not in _TWINS:
        try:
            _TWINS[kern] = cls(kern)
        except (NotImplementedError, ValueError, KeyError) as why:
            states = ", ".join(kern.states if hasattr(kern, "states") else kern.spec.states)
            raise unsupported(f"triton kernel {kern.name}", states,
                              f"no torch twin ({why}); run the layer with backend='torch' for "
                              "second derivatives") from why
    return _TWINS[kern]


def _apply(n, args, dt):
    """The torch value of the elementwise node n from its sources' values."""
    op = n.op
    if op == Op.WHERE:
        c, a, b = args
        return torch.where(c if c.dtype == torch.bool else c != 0, _num(a, dt), _num(b, dt))
    args = [_num(a, dt) for a in args]
    if op in _UNARY:
        return _UNARY[op](args[0])
    if op in _BINARY:
        return _BINARY[op](*args)
    raise NotImplementedError(f"no torch twin for {op.name}")   # texpr.FUSABLE is covered above


def _num(x, dt):
    return x.to(dt) if x.dtype == torch.bool else x


def _eval_region(region, roots, env: dict, dt, dev) -> list:
    """Values of `roots` (Nodes) of a fused region; env: ref id -> tensor for its leaves and
    stop values (each already broadcast like the kernel's tiles)."""
    vals = dict(env)

    def val(n, view=()):
        if texpr.literal(n) is not None:
            return torch.tensor(float(n.arg), dtype=dt, device=dev)
        return vals[resolve(n, view).id]
    for ref in region.cone(roots):
        vals[ref.id] = _apply(ref.node, [val(s, ref.view) for s in ref.node.srcs], dt)
    return [None if r is None else val(r) for r in roots]


def _segments(cu, T: int):
    """(batch rows, initial-state rows, first step, end step) of each sequence: all rows at
    once, or one packed sequence of cu_seqlens at a time (a batch of one)."""
    if cu is None:
        return [(slice(None), slice(None), 0, T)]
    b = [int(v) for v in cu.tolist()]
    return [(slice(0, 1), slice(i, i + 1), b[i], b[i + 1]) for i in range(len(b) - 1)]


def _assemble(pieces: list, T: int):
    """Per sequence (first step, end step, its steps [rows, L, ...] in memory order) -> the
    whole [rows, T, ...] (steps no sequence covers are zeros)."""
    parts, t = [], 0
    for t0, t1, x in pieces:
        if t0 > t:
            parts.append(x.new_zeros((x.shape[0], t0 - t) + tuple(x.shape[2:])))
        parts.append(x)
        t = t1
    if t < T:
        parts.append(x.new_zeros((x.shape[0], T - t) + tuple(x.shape[2:])))
    return torch.cat(parts, 1)


# --------------------------------------------------------------------------- scan stages

def scan_twin(kern):
    """The torch twin of a ScanKernel: f(h0, leaves, rleaves, c3, store, run) -> the
    outputs of launch._ScanFn."""
    return _twin(kern, _ScanTwin)


class _ScanTwin:
    def __init__(self, kern):
        self.kern, self.spec = kern, kern.spec
        for region in (kern.region, kern.epi, kern.red):
            for ref in region.nodes:
                if ref.node.op not in _UNARY and ref.node.op not in _BINARY and ref.node.op != Op.WHERE:
                    raise NotImplementedError(f"no torch form for {ref.node.op.name}")

    def _coefs(self, env, dt, dev):
        """The scan's (A, b) entries as tensors, identities where a coefficient is absent
        (as ScanKernel._entries: a k = 1 decay of 1 (diag) or 0 (semirings), an input of 0
        or -inf; a block's missing entries 0)."""
        sp, k = self.spec, self.spec.k
        if sp.kind == "block":
            one, zero = 0.0, 0.0
        else:
            one, zero = (1.0, 0.0) if sp.kind == "diag" else (0.0, float("-inf"))
        const = lambda v: torch.tensor(v, dtype=dt, device=dev)  # noqa: E731
        vals = _eval_region(self.kern.region, [a for row in sp.A for a in row] + list(sp.b), env, dt, dev)
        A = [[const(one) if v is None else v for v in vals[i * k:(i + 1) * k]] for i in range(k)]
        b = [const(zero) if v is None else v for v in vals[k * k:]]
        return A, b

    def __call__(self, h0, full, red, c3: tuple, store: bool, run):
        rev, cu, B, T = run
        sp, k, kern = self.spec, self.spec.k, self.kern
        dt, dev = h0.dtype, h0.device
        C = h0.shape[1]
        shape5 = (B, T) + tuple(c3)
        env = {leaf.id: (x != 0 if leaf.is_bool else x) for x, leaf in zip(full, kern.leaves)}
        A, b = self._coefs(env, dt, dev)
        flat = lambda v: v.expand(shape5).reshape(B, T, C)  # noqa: E731
        A = [[flat(a) for a in row] for row in A]
        b = [flat(v) for v in b]
        pieces, fins = [], []
        for rows, hrows, t0, t1 in _segments(cu, T):
            h0s = h0[hrows]
            if t1 == t0:
                pieces.append((t0, t1, h0.new_zeros((h0s.shape[0] if cu is None else 1, 0, C, k))))
                fins.append(h0s)
                continue
            seg = lambda v: v[rows, t0:t1].flip(1) if rev else v[rows, t0:t1]  # noqa: E731
            if sp.kind == "block":
                Am = torch.stack([torch.stack([seg(a) for a in row], -1) for row in A], -2)   # [b, L, C, k, k]
                h = scans._block_doubling(Am, torch.stack([seg(v) for v in b], -1), h0s)
            else:
                h = scans.doubling_scan(sp.kind, seg(A[0][0]), seg(b[0]), h0s[..., 0])[..., None]
            fins.append(h[:, -1])
            pieces.append((t0, t1, h.flip(1) if rev else h))
        hseq = _assemble(pieces, T)                                  # [B, T, C, k]
        hfin = torch.cat(fins, 0)
        outs = self._epilogue(hseq, red, env, shape5, dt, dev)
        if not store:
            hseq = h0.new_zeros((1, 1, 1, k))
        return (hseq, hfin) + tuple(outs)

    def _epilogue(self, hseq, red, env, shape5, dt, dev):
        """The outputs computed from the new states: elementwise ones [B, T, C], then the
        readouts h' @ q (reduced over N) and what is elementwise in them [B, T, C / N]."""
        sp, kern = self.spec, self.kern
        if not (sp.outputs or sp.readouts):
            return []
        B, T = shape5[:2]
        env = dict(env)
        for i, u in enumerate(sp.updates):
            env[u.id] = hseq[..., i].reshape(shape5)
        roots = list(sp.outputs) + [q for _, _, q in sp.readouts]
        vals = _eval_region(kern.epi, roots, env, dt, dev)
        outs = [v.expand(shape5).reshape(B, T, -1) for v in vals[:len(sp.outputs)]]
        if not sp.readouts:
            return outs
        renv = {leaf.id: (x != 0 if leaf.is_bool else x) for x, leaf in zip(red, kern.rleaves)}
        axis = -1 if sp.rax == 2 else -2
        for j, (r, si, _) in enumerate(sp.readouts):
            q = vals[len(sp.outputs) + j]
            renv[r.id] = (env[sp.updates[si].id] * q).sum(axis, keepdim=True)
        rshape = list(shape5)
        rshape[axis] = 1
        reds = _eval_region(kern.red, list(sp.reduced), renv, dt, dev)
        return outs + [v.expand(tuple(rshape)).reshape(B, T, -1) for v in reds]


# --------------------------------------------------------------------------- sequential stages

def seq_twin(kern):
    """The torch twin of a SeqKernel: f(h0s, views, params, dims, run) -> the outputs of
    launch._SeqFn."""
    return _twin(kern, _SeqTwin)


class _SeqTwin:
    def __init__(self, kern):
        self.kern = kern
        ir = kern.ir
        self.state_nodes = [ir.states[s] for s in kern.states]
        self.params = kern.params_all()
        self.step = compile_nodes([ir.updates[s] for s in kern.states],
                                  list(kern.leaves) + list(self.params) + self.state_nodes)

    def __call__(self, h0, views, params, dims, run):
        B, T, NH, heads, stores = dims
        rev, cu, _, varlen = run
        kern, ir = self.kern, self.kern.ir
        dt, dev = h0[0].dtype, h0[0].device
        sshape = [tuple(ir.shape_of(s)) for s in self.state_nodes]
        P = [p[None] if heads else p[None, None] for p in params]          # prefix [1, NH] (or [1, 1])
        leaf_shapes = [tuple(ir.shape_of(x)) for x in kern.leaves]   # the views hold them flat: [B, T, NH, n]
        views = [v != 0 if x.is_bool else v for v, x in zip(views, kern.leaves)]
        pieces = [[] for _ in h0]
        fins = [[] for _ in h0]
        for rows, hrows, t0, t1 in _segments(cu if varlen else None, T):
            st = [h[hrows].reshape((h[hrows].shape[0], NH) + sh) for h, sh in zip(h0, sshape)]
            steps = [[] for _ in h0]
            order = range(t1 - 1, t0 - 1, -1) if rev else range(t0, t1)
            for t in order:
                xs = [v[rows, t].reshape(v[rows, t].shape[:2] + sh) for v, sh in zip(views, leaf_shapes)]
                new = self.step(xs + P + st, 2, dt, dev)
                st = [n.expand(s.shape) if n.shape != s.shape else n for n, s in zip(new, st)]
                for acc, s in zip(steps, st):
                    acc.append(s.reshape(s.shape[0], NH, -1))
            for k, (acc, s) in enumerate(zip(steps, st)):
                fins[k].append(s.reshape(s.shape[0], NH, -1))
                if acc:
                    seq = torch.stack(acc[::-1] if rev else acc, 1)             # memory order
                else:
                    seq = h0[k].new_zeros((s.shape[0], 0, NH, h0[k].shape[-1]))
                pieces[k].append((t0, t1, seq))
        seqs = [_assemble(p, T) if keep else h.new_zeros((1, 1, 1, 1))
                for p, h, keep in zip(pieces, h0, stores)]
        return tuple(seqs) + tuple(torch.cat(f, 0) for f in fins)
