"""recdsl layers inside `torch.compile` (fullgraph=True included).

A layer's forward runs generated Python, ctypes calls into generated C, custom autograd
Functions and (on a fresh layer's first call) the kernel cache's builds: nothing Dynamo can
trace. So while a layer is being compiled (`torch.compiler.is_compiling()`), its
`forward` hands the whole call to ONE opaque custom op, and the graph holds two ops per
layer call:

    recdsl::layer_forward(handle, input names, inputs, params, state names, states,
                          reverse, cu_seqlens) -> outputs + final states
    recdsl::layer_backward(same, grads, needs) -> the gradients the graph needs

- `handle` is an int naming the layer in a process-local registry (weak references). Every
  layer gets one when it is built, unpickled or deep-copied, in `layer._compile_sig`
  (handle and the layer's static names); Dynamo reads that tuple as a constant of the
  module and guards on it, so a compiled graph calls exactly its own layers.
- `layer_forward` runs the layer's eager `forward` on the given tensors, with the params
  given (the traced ones: `torch.func.functional_call` and parameter swaps reach it) and no
  autograd graph. Its fake (meta) implementation runs the eager argument checks (a wrong
  shape is the same RecError at trace time) and gives the shapes from the cell: outputs
  [B, T, (heads,) *shape], final states [B (or the number of cu_seqlens sequences),
  (heads,) *shape]; the compute dtype (bf16/fp16 inputs: outputs of their dtype).
- `layer_backward` (the forward's autograd formula, `register_autograd`) recomputes the
  eager forward with autograd recording (grad mode on, and the Autograd dispatch keys, which
  a custom op's implementation runs without, turned back on) and returns
  `torch.autograd.grad` of it: one extra forward per backward, as activation
  checkpointing does; the C kernels and the
  chunkwise forms run their own derived backward inside it. Only the gradients the graph
  needs are computed.
- Eager mode is untouched (one `is_compiling()` check per forward). The ops run the same
  generated code and loaded libraries as eager calls: a layer's C library is built or
  loaded on its first call (the kernel cache: files, a lock), every later call reuses the
  loaded library, with no filesystem access and no lock.

Not covered under compile (each is a graph break, so fullgraph=True raises, and a plain
`torch.compile` runs it eagerly): cells over grids and DAGs, `reverse` given as a tensor.
Second derivatives through a layer (create_graph=True) raise under compile; eager mode
has them.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import NamedTuple

import torch
from torch.nn.utils.stateless import _reparametrize_module

from .errors import RecError


class Signature(NamedTuple):
    """What the traced code reads of a layer: plain constants, so Dynamo guards on values."""
    handle: int
    params: tuple      # param names, in registration order
    states: tuple      # state dict entries, in the order forward returns them
    outputs: int       # number of outputs (one: forward returns the tensor, else a tuple)
    seq: bool          # a sequence cell (grids and DAGs run eagerly)


_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_COUNTER = itertools.count(1)
_LOCK = threading.Lock()   # taken when a layer is built, never on a forward


def register(layer) -> Signature:
    """A fresh handle for `layer` (when it is built, unpickled or deep-copied)."""
    with _LOCK:
        handle = next(_COUNTER)
        _LAYERS[handle] = layer
    seq = layer.ir.over == "seq"
    states = tuple(layer._state_shapes(1)) if seq else ()
    return Signature(handle, tuple(layer.spec.cell.params), states, len(layer.ir.outputs), seq)


def _layer(handle: int):
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"recdsl: the layer of compiled handle {handle} no longer exists")
    return layer


def _eager(layer, params, x_names, xs, s_names, states, reverse: int, cu):
    """The layer's eager forward with `params` in place of its own; flat (outputs, final
    states in the signature's order)."""
    inputs = dict(zip(x_names.split(","), xs))
    state = dict(zip(s_names.split(","), states)) if s_names else None
    sig = layer._compile_sig
    own = layer._parameters
    swap = contextlib.nullcontext() if all(own.get(n) is p for n, p in zip(sig.params, params)) else \
        _reparametrize_module(layer, dict(zip(sig.params, params)))   # functional_call's, or the backward's leaves
    with swap:
        out, st = layer.forward(state=state, reverse=None if reverse < 0 else bool(reverse),
                                cu_seqlens=cu, **inputs)
    outs = [out] if sig.outputs == 1 else list(out)
    return outs, [st[s] for s in sig.states]


def _fresh(ts, inputs):
    """Contiguous tensors sharing no memory with the op's inputs or with each other (a
    custom op's outputs must not alias; b_ih and b_hh may get one gradient tensor), as the
    fake implementation promises them."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    out = []
    for t in ts:
        t = t.contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in ptrs:
                t = t.clone()
            ptrs.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


def _dtypes(params, xs):
    """(compute dtype, output dtype) as forward decides them."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in list(params) + list(xs)) else torch.float32
    first = xs[0].dtype
    return dtype, (first if first in (torch.float16, torch.bfloat16) else dtype)


@torch.library.custom_op("recdsl::layer_forward", mutates_args=())
def layer_forward(handle: int, x_names: str, xs: list[torch.Tensor], params: list[torch.Tensor],
                  s_names: str, states: list[torch.Tensor], reverse: int,
                  cu: torch.Tensor | None) -> list[torch.Tensor]:
    layer = _layer(handle)
    with torch.no_grad():
        outs, finals = _eager(layer, params, x_names, xs, s_names, states, reverse, cu)
    dtype, out_dtype = _dtypes(params, xs)
    return _fresh([o.to(out_dtype) for o in outs] + [s.to(dtype) for s in finals], xs + params + states)


@layer_forward.register_fake
def _(handle, x_names, xs, params, s_names, states, reverse, cu):
    layer = _layer(handle)
    sig = layer._compile_sig
    inputs = dict(zip(x_names.split(","), xs))
    B, T = layer._check_inputs(inputs, per_step=False)   # the eager errors, at trace time
    dtype, out_dtype = _dtypes(params, xs)
    NB = B if cu is None else cu.shape[0] - 1
    if s_names:
        layer._check_state(dict(zip(s_names.split(","), states)), NB, dtype, xs[0].device)
    heads = (layer.heads,) if layer.heads else ()
    ir = layer.ir
    x = xs[0]
    outs = [x.new_empty((B, T) + heads + ir.shape_of(ir.outputs[o]), dtype=out_dtype) for o in ir.outputs]
    finals = [x.new_empty((NB,) + heads + ir.shape_of(ir.states[s]), dtype=dtype) for s in sig.states]
    return outs + finals


@contextlib.contextmanager
def _autograd_on():
    """Grad mode with autograd recording: a custom op's implementation runs below the
    Autograd dispatch keys (they are excluded from this thread's dispatch), which the
    recomputation needs back for its graph."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther,
                C.DispatchKey.AutogradNestedTensor, C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("recdsl::layer_backward", mutates_args=())
def layer_backward(handle: int, x_names: str, xs: list[torch.Tensor], params: list[torch.Tensor],
                   s_names: str, states: list[torch.Tensor], reverse: int, cu: torch.Tensor | None,
                   grads: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor]:
    """The gradients of the tensors flagged in `needs` (over xs + params + states, in order):
    the eager forward recomputed with a graph, then autograd.grad."""
    layer = _layer(handle)
    flat = xs + params + states
    nx, npar = len(xs), len(params)
    with _autograd_on():
        leaves = [t.detach().requires_grad_(n) for t, n in zip(flat, needs)]
        outs, finals = _eager(layer, leaves[nx:nx + npar], x_names, leaves[:nx], s_names, leaves[nx + npar:],
                              reverse, cu)
        pairs = [(o, g) for o, g in zip(outs + finals, grads) if o.requires_grad]
        wrt = [t for t, n in zip(leaves, needs) if n]
        got = (torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs],
                                   allow_unused=True) if pairs else [None] * len(wrt))
    res = [torch.zeros_like(t) if g is None else g.to(t.dtype) for t, g in zip(wrt, got)]
    return _fresh(res, flat + grads)


@layer_backward.register_fake
def _(handle, x_names, xs, params, s_names, states, reverse, cu, grads, needs):
    return [t.new_empty(t.shape) for t, n in zip(xs + params + states, needs) if n]


def _setup_context(ctx, inputs, output):
    handle, x_names, xs, params, s_names, states, reverse, cu = inputs
    ctx.args = (handle, x_names, s_names, reverse)
    ctx.sizes = (len(xs), len(params), len(states))
    ctx.has_cu = cu is not None
    ctx.shapes = [(o.shape, o.dtype) for o in output]   # for a gradient autograd left as None
    ctx.save_for_backward(*xs, *params, *states, *([cu] if cu is not None else []))


def _backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    nx, npar, ns = ctx.sizes
    xs, params, states = saved[:nx], saved[nx:nx + npar], saved[nx + npar:nx + npar + ns]
    cu = saved[-1] if ctx.has_cu else None
    handle, x_names, s_names, reverse = ctx.args
    need = ctx.needs_input_grad
    needs = [bool(n) for n in list(need[2]) + list(need[3]) + list(need[5])]
    if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
        raise RuntimeError("recdsl: second derivatives through a layer inside torch.compile are not "
                           "supported (eager mode has them)")
    full = [None] * len(needs)
    if any(needs):
        x = xs[0]
        grads = [x.new_zeros(shape, dtype=dt) if g is None else g for g, (shape, dt) in zip(grads, ctx.shapes)]
        it = iter(layer_backward(handle, x_names, xs, params, s_names, states, reverse, cu, grads, needs))
        full = [next(it) if n else None for n in needs]
    return None, None, full[:nx], full[nx:nx + npar], None, full[nx + npar:], None, None


layer_forward.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(layer, state, reverse, cu_seqlens, edges, inputs):
    return layer.forward(state=state, reverse=reverse, cu_seqlens=cu_seqlens, edges=edges, **inputs)


_run_eagerly = None   # _eager_forward outside the graph (a graph break); made on first use:
                      # torch.compiler.disable imports Dynamo (seconds), which eager users never need


def _eagerly():
    global _run_eagerly
    if _run_eagerly is None:
        _run_eagerly = torch.compiler.disable(_eager_forward)
    return _run_eagerly


def forward(layer, state, reverse, cu_seqlens, edges, inputs: dict):
    """RecModule.forward while compiling: one `recdsl::layer_forward` call; the same
    return as forward, (output or tuple of outputs, {state: final})."""
    sig = layer._compile_sig
    if not sig.seq or edges is not None or isinstance(reverse, torch.Tensor):
        return _eagerly()(layer, state, reverse, cu_seqlens, edges, inputs)   # a graph break
    if not inputs:
        layer._check_inputs(inputs, per_step=False)   # the eager error: missing inputs
    x_names = list(inputs)
    xs = [inputs[n] for n in x_names]
    for n, x in zip(x_names, xs):
        if not isinstance(x, torch.Tensor):
            raise RecError(f"input {n} must be a torch.Tensor, got {type(x).__name__}")
    if state is None:
        s_names, states = [], []
    else:
        if not isinstance(state, dict):
            raise RecError("state must be a dict {name: tensor}, as returned by forward")
        s_names = list(state)
        states = [state[n] for n in s_names]
        for n, t in zip(s_names, states):
            if not isinstance(t, torch.Tensor):
                raise RecError(f"state {n} must be a torch.Tensor, got {type(t).__name__}")
    if reverse is not None and not isinstance(reverse, bool):
        raise RecError(f"reverse must be True or False, got {reverse!r}")
    rev = -1 if reverse is None else int(reverse)
    cu = cu_seqlens
    if cu is not None and not isinstance(cu, torch.Tensor):
        cu = torch.tensor(list(cu))
    params = [getattr(layer, n) for n in sig.params]
    res = layer_forward(sig.handle, ",".join(x_names), xs, params, ",".join(s_names), states, rev, cu)
    outs = res[:sig.outputs]
    return (outs[0] if sig.outputs == 1 else tuple(outs)), dict(zip(sig.states, res[sig.outputs:]))
