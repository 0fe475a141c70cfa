"""The compiled cell as a torch.nn.Module.

    layer = recdsl.load("gla")(K=16, V=16, heads=2)
    o, state = layer(q=q, k=k, v=v, gk=gk)             # inputs [B, T, (heads,) *shape]
    o, state = layer(q=q, k=k, v=v, gk=gk, state=state) # continue
    o_t, state = layer.step(q=q_t, ..., state=state)    # one step: inputs [B, (heads,) *shape]

Parameters are registered under their .rec names ([heads, *shape] when the module has
heads) and initialised by the .rec initialisers; a complex param has a trailing axis of 2
(real, imaginary: `torch.view_as_complex(layer.z)` is the complex tensor), and a complex
state `h` is two entries of the state dict, `h.re` and `h.im`. Computation and states are
fp32 (fp64 after `.double()` or with fp64 inputs); bf16/fp16 inputs give outputs of their
dtype.
`reverse=True` runs right to left; `cu_seqlens` packs variable-length sequences into a
batch of one, as flash-linear-attention does.

Over grids and DAGs (docs/LANGUAGE.md, *Grids and DAGs at call time*):
    y, cells = layer(x=x)                        # over grid2d: inputs [B, X, Y, (heads,) *shape]
    y, cells = layer(x=x, flip=(True, False))    # scanned from the last row of X
    y, st = layer(x=x, s=s, t=t, edges=edges)    # over dag: edges [E, 2], node inputs [B, N, ...],
                                                 # edge inputs [B, E, ...], pair inputs [B, NP, ...]
                                                 # in recdsl.graph.line_pairs(edges)' order
"""
from __future__ import annotations

import copy
import math
import operator

import torch
from torch import nn

from . import ast as A
from . import torch_compile
from .builtins import DISTRIBUTIONS
from .checker import MAX_DIM, MAX_NUMEL, ConstFolder, NotConstant
from .errors import RecError
from .ir import IRCell, lower
from .pipeline import BUILT, OPT_IN, backend_module, compile_cell

BACKENDS = ("auto", "reference", "torch", "triton", "newton")


class RecModule(nn.Module):
    def __init__(self, spec, dims: dict, heads: int | None = None, backend: str = "auto",
                 reverse: bool = False, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        cell = spec.cell
        self.spec = spec
        self.default_reverse = _flag(reverse, "reverse")
        dims = dict(dims)
        self.heads = self._resolve_heads(cell, dims, heads)
        self._lowered_with = dict(dims)
        self.ir: IRCell = lower(cell, dims)
        self.dims = dict(self.ir.dims)
        self.backend_name = self._pick_backend(backend)
        self._build_program()
        for name, var in cell.params.items():
            shape = self._param_shape(var)
            p = nn.Parameter(torch.empty(shape, dtype=dtype or torch.float32, device=device))
            try:
                self.register_parameter(name, p)
            except KeyError:   # the checker refuses MODULE_API names; a newer torch may add more
                raise RecError(f"param {name} collides with an attribute of torch.nn.Module in this torch "
                               f"({torch.__version__})", var.span, hint=f"rename it, e.g. {name}_") from None
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    # Generated code lives in no importable module: pickling drops it and loading re-creates
    # it, and the IR, from the checked cell in self.spec (IR node ids are per process: an
    # unpickled IR would collide with the nodes a new process makes); deepcopy shares them
    # (they hold no state).
    _GENERATED = ("compiled", "_program", "_step_fn")

    def _build_program(self) -> None:
        self.compiled = compile_cell(self.ir, self.backend_name)   # plan -> select -> emit -> build, once
        self._program = self.compiled.program
        self.generated = self._program.source
        # step() (one step, for decoding) runs the reference's generated step; reuse it if built
        self._step_fn = getattr(self._program, "step", None)
        self._compile_sig = torch_compile.register(self)   # its handle for recdsl::layer_forward (torch.compile)
        if self._step_fn is None and self.ir.over == "seq":
            from .backends import reference
            self._step_fn, _ = reference.build_step(self.ir)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._GENERATED + ("ir",)}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.ir = lower(self.spec.cell, self._lowered_with)
        self._build_program()

    def __deepcopy__(self, memo):
        for k in self._GENERATED + ("ir", "spec"):   # immutable once built: shared, not copied
            memo[id(self.__dict__[k])] = self.__dict__[k]
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new._compile_sig = torch_compile.register(new)
        return new

    @staticmethod
    def _resolve_heads(cell, dims: dict, heads: int | None) -> int | None:
        if cell.heads is None:
            if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int)
                                      or not 1 <= heads <= MAX_DIM):
                raise RecError(f"heads must be an integer from 1 to {MAX_DIM} (2**31 - 1), got {heads!r}"[:200])
            return heads
        count = cell.heads
        if isinstance(count, A.Name):
            if heads is not None:
                if dims.get(count.id, heads) != heads:
                    raise RecError(f"heads={heads} disagrees with {count.id}={dims[count.id]}", cell.span)
                dims[count.id] = heads
            if count.id not in dims and cell.dims[count.id].default is None:
                raise RecError(f"cell {cell.name} runs `heads {count.id}`: give {count.id}= (or heads=)", cell.span)
            from .ir import _const_value
            return int(dims.get(count.id) or _const_value(cell.dims[count.id].default, {}))
        from .ir import _const_value
        return int(_const_value(count, dims))

    def _pick_backend(self, backend: str) -> str:
        if backend not in BACKENDS:
            raise RecError(f"unknown backend '{backend}'", hint="backends: " + ", ".join(BACKENDS))
        if backend == "auto":  # the fastest built backend that runs the cell (Triton only on a GPU)
            order = ("triton", "torch", "reference") if torch.cuda.is_available() else ("torch", "reference")
            for name in order:
                if backend_module(name).supports(self.ir) is None:
                    return name
            return "reference"
        if backend not in BUILT + OPT_IN:
            raise RecError(f"the {backend} backend is not built yet",
                           hint="built: " + ", ".join(BUILT + OPT_IN) + " (or 'auto')")
        return backend

    def _param_shape(self, var) -> tuple[int, ...]:
        # the IR's shape: a complex param has a trailing axis of 2 (its real and imaginary parts)
        shape = ((self.heads,) if self.heads else ()) + self.ir.concrete(self.ir.params[var.name].shape)
        if math.prod(shape) > MAX_NUMEL:
            raise RecError(f"param {var.name} would have {math.prod(shape)} elements {list(shape)} with "
                           f"heads={self.heads}, more than the maximum {MAX_NUMEL} (2**31 - 1)", var.span,
                           hint="fewer heads, or smaller dimensions")
        return shape

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)draw every param from its .rec initialiser."""
        for name, var in self.spec.cell.params.items():
            p = getattr(self, name)
            init = var.decl.init
            if isinstance(init, A.RandomInit):
                pos = [a for a in init.args if not isinstance(a, A.Keyword)]
                vals = {n: float(_const(a, self.ir.hypers)) for n, a in zip(DISTRIBUTIONS[init.dist], pos)}
                vals.update({a.name: float(_const(a.value, self.ir.hypers))
                             for a in init.args if isinstance(a, A.Keyword)})
                if init.dist == "normal":
                    p.normal_(vals["mean"], vals["std"])
                else:
                    p.uniform_(vals["low"], vals["high"])
            elif var.type.is_complex:   # a complex value (or a real one: imaginary part 0) per element
                value = torch.as_tensor(_const(init.value, self.ir.hypers), dtype=torch.complex128)
                value = value.to(p.device).expand(p.shape[:-1])
                p.copy_(torch.stack([value.real, value.imag], -1).to(p.dtype))
            else:
                value = _const(init.value, self.ir.hypers)
                p.copy_(torch.as_tensor(value, dtype=p.dtype).expand(p.shape))

    @property
    def plan(self):
        """The plan this module runs (its selections say which form and kernel run each
        stage on every backend); the sympy / float64 checks are filled in on first read."""
        from .analysis import verify
        return verify(self.compiled.plan)

    @property
    def selection(self):
        """Which form and kernel run each stage on this module's backend."""
        return self.compiled.selection

    @property
    def newton_options(self):
        """backend="newton": how it solves (backends/newton/solve.py NewtonOptions: max_iters,
        tol, damping), mutable between calls; None on other backends."""
        return getattr(self._program, "options", None)

    @property
    def last_solve(self) -> list:
        """backend="newton": per Newton stage of the last forward, its iterations and final
        residual (solve.SolveReport); empty on other backends."""
        return list(getattr(self._program, "last_solve", []))

    @property
    def ran(self) -> list[str]:
        """The kernel of each stage as the last forward executed them (empty before one)."""
        return list(getattr(self._program, "ran", []))

    # ------------------------------------------------------------------ running
    def initial_state(self, batch: int, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
        out = {}
        lead = (batch,) + ((self.heads,) if self.heads else ())
        for name, var in self.spec.cell.states.items():
            shape = lead + self.ir.concrete(var.shape)
            init = var.decl.init
            keys = self.ir.complex_states.get(name)
            if init is None:
                value = torch.zeros(shape, dtype=dtype, device=device)
            elif isinstance(init.value, A.Name) and init.value.id in self.spec.cell.params:
                # A learned initial state: the param, broadcast over the batch (gradients flow to it).
                value = getattr(self, init.value.id).to(dtype)
                if init.value.id in self.ir.complex_params:   # parts on its trailing axis
                    value = (value[..., 0], value[..., 1])
                value = tuple(v.expand(shape) for v in value) if isinstance(value, tuple) else value.expand(shape)
            else:
                v = _const(init.value, self.ir.hypers)
                if keys:
                    v = torch.as_tensor(v, dtype=torch.complex128, device=device)
                    value = tuple(x.to(dtype).expand(shape).clone() for x in (v.real, v.imag))
                else:
                    value = torch.as_tensor(v, dtype=dtype, device=device).expand(shape).clone()
            if keys:   # a complex state: its real and imaginary parts (a real value has imaginary part 0)
                parts = value if isinstance(value, tuple) else (value, torch.zeros(shape, dtype=dtype, device=device))
                out.update(zip(keys, parts))
            else:
                out[name] = value
        return out

    def _compute_dtype(self, tensors) -> torch.dtype:
        if any(t.dtype == torch.float64 for t in tensors):
            return torch.float64
        # the cell's params are this module's own (no submodules): its dict, not parameters()'s walk
        return torch.float64 if any(p.dtype == torch.float64 for p in self._parameters.values()) else torch.float32

    def _check_inputs(self, inputs: dict, per_step: bool):
        cell = self.spec.cell
        missing = [n for n in cell.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in cell.inputs]
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], list(cell.inputs), n=1)
            raise RecError(f"cell {cell.name} has no input {unknown[0]}",
                           hint=(f"did you mean {close[0]}? " if close else "") + "inputs: " + ", ".join(cell.inputs))
        if missing:
            raise RecError(f"missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)} for cell {cell.name}",
                           hint="inputs: " + ", ".join(f"{n}{list(self.ir.concrete(v.shape))}" for n, v in cell.inputs.items()))
        lead = None
        nlead = 1 if per_step else 2
        heads = (self.heads,) if self.heads else ()
        for name, var in cell.inputs.items():
            x = inputs[name]
            if not isinstance(x, torch.Tensor):
                raise RecError(f"input {name} must be a torch.Tensor, got {type(x).__name__}")
            want = heads + self.ir.concrete(var.shape)
            if x.dim() != nlead + len(want) or tuple(x.shape[nlead:]) != want:
                layout = "[B" + ("" if per_step else ", T") + (", heads" if heads else "") + \
                         "".join(f", {d}" for d in var.shape) + "]"
                raise RecError(f"input {name} has shape {list(x.shape)}, expected {layout} = "
                               f"[{', '.join(['B'] + ([] if per_step else ['T']) + [str(w) for w in want])}]")
            if lead is None:
                lead = tuple(x.shape[:nlead])
            elif tuple(x.shape[:nlead]) != lead:
                raise RecError(f"input {name} has leading dims {list(x.shape[:nlead])}, others {list(lead)}",
                               hint="all inputs share [B, T]")
            if not x.is_floating_point():
                raise RecError(f"input {name} must be floating point, got {x.dtype}")
        return lead

    def _state_shapes(self, batch: int) -> dict[str, tuple]:
        """Each entry of the state dict and its shape (a complex state: its two parts)."""
        lead = (batch,) + ((self.heads,) if self.heads else ())
        out = {}
        for name, var in self.spec.cell.states.items():
            shape = lead + self.ir.concrete(var.shape)
            out.update({key: shape for key in self.ir.complex_states.get(name, (name,))})
        return out

    def _check_state(self, state, batch: int, dtype, device) -> dict[str, torch.Tensor]:
        if state is None:
            return self.initial_state(batch, dtype, device)
        if not isinstance(state, dict):
            raise RecError("state must be a dict {name: tensor}, as returned by forward")
        want = self._state_shapes(batch)
        out = {}
        for name, shape in want.items():
            if name not in state:
                raise RecError(f"state dict lacks {name}", hint="states: " + ", ".join(want))
            t = state[name]
            if not isinstance(t, torch.Tensor):
                raise RecError(f"state {name} must be a torch.Tensor, got {type(t).__name__}",
                               hint=f"shape {list(shape)}, as forward returns it")
            if not t.is_floating_point():
                raise RecError(f"state {name} must be floating point, got {t.dtype}")
            if tuple(t.shape) != shape:
                raise RecError(f"state {name} has shape {list(t.shape)}, expected {list(shape)}")
            out[name] = t if t.dtype == dtype else t.to(dtype)
        extra = [n for n in state if n not in want]
        if extra:
            raise RecError(f"state dict has unknown entries {', '.join(extra)}")
        return out

    def _stored_params(self, dtype) -> dict[str, torch.Tensor]:
        """The params as stored, in dtype (a registered param read from the module's dict)."""
        got = {}
        for n in self.spec.cell.params:
            p = self._parameters.get(n)
            p = getattr(self, n) if p is None else p
            got[n] = p if p.dtype == dtype else p.to(dtype)
        return got

    def _params(self, dtype) -> dict[str, torch.Tensor]:
        # One leading axis of 1 for the batch: every tensor in the step has the same prefix rank.
        return {n: getattr(self, n).to(dtype)[None] for n in self.spec.cell.params}

    def forward(self, state: dict | None = None, reverse: bool | None = None, cu_seqlens=None, edges=None,
                flip=None, **inputs):
        if isinstance(state, torch.Tensor) or isinstance(reverse, torch.Tensor) and reverse.dim() > 0:
            names = ", ".join(f"{n}=..." for n in self.spec.cell.inputs)
            raise RecError(f"cell {self.spec.name} takes its inputs by name, not by position",
                           hint=f"call it as layer({names}), with state=, reverse=, cu_seqlens= by name too")
        if flip is not None and self.ir.over != "grid2d":
            raise RecError(f"flip= is for cells that run `over grid2d`; this one runs over {self.ir.over}",
                           hint="over seq, reverse=True scans right to left" if self.ir.over == "seq" else None)
        if torch.compiler.is_compiling():   # one opaque op per call: recdsl/torch_compile.py
            if flip is not None:            # a grid runs eagerly there: flip travels with the inputs
                inputs = {**inputs, "flip": flip}
            return torch_compile.forward(self, state, reverse, cu_seqlens, edges, inputs)
        if self.ir.over != "seq":
            for name, given in (("reverse", reverse), ("cu_seqlens", cu_seqlens), ("state", state)):
                if given is not None:
                    raise RecError(f"{name}= is for cells that run over sequences; this one runs over {self.ir.over}",
                                   hint="over grid2d, flip=(bool, bool) sets the scan's direction"
                                   if name == "reverse" and self.ir.over == "grid2d" else None)
            return self._forward_graph(inputs, edges, flip)
        if edges is not None:
            raise RecError("edges= is for cells that run `over dag`")
        (B, T) = self._check_inputs(inputs, per_step=False)
        if T == 0:
            raise RecError("the inputs have no time steps (T = 0)")
        if B == 0:
            raise RecError("the inputs have an empty batch (B = 0)")
        reverse = self.default_reverse if reverse is None else _flag(reverse, "reverse")
        first = next(iter(inputs.values()))
        out_dtype = first.dtype
        dtype = self._compute_dtype(inputs.values())
        xs = {n: x.to(dtype) for n, x in inputs.items()}
        if cu_seqlens is not None:
            return self._forward_varlen(xs, state, reverse, cu_seqlens, dtype, out_dtype)
        st = self._check_state(state, B, dtype, first.device)
        outs, st = self._run(xs, st, reverse, dtype)
        return self._pack(outs, out_dtype), st

    def _run(self, xs, st, reverse: bool, dtype, cu=None):
        """cu (cu_seqlens as a tensor) only for a program that runs them natively."""
        if next(iter(xs.values())).shape[1] == 0:
            raise RecError("the inputs have no time steps (T = 0)")
        native = getattr(self._program, "native", False)   # the kernels index time themselves
        flip = reverse and not native
        if flip:  # right to left: run on the flipped sequence, flip the outputs back
            xs = {n: x.flip(1) for n, x in xs.items()}
        params = {n: getattr(self, n).to(dtype) for n in self.spec.cell.params}
        device = next(iter(xs.values())).device
        if native:
            outs, st = self._program.run(xs, st, params, self.heads, dtype, device, reverse, cu)
        else:
            outs, st = self._program.run(xs, st, params, self.heads, dtype, device)
        B, T = next(iter(xs.values())).shape[:2]
        NB = B if cu is None else cu.numel() - 1   # final states: one per sequence of cu_seqlens
        heads = (self.heads,) if self.heads else ()
        # an output that reads only params is computed once; give it the full [B, T, ...] shape
        outs = {o: v.expand((B, T) + heads + self.ir.shape_of(self.ir.outputs[o])) for o, v in outs.items()}
        # a state whose update reads no input (s' = 2) comes back without the batch axes
        st = {s: v.expand((NB,) + heads + self.ir.shape_of(self.ir.states[s])) for s, v in st.items()}
        if flip:
            outs = {o: v.flip(1) for o, v in outs.items()}
        return outs, st

    def _forward_varlen(self, xs, state, reverse, cu_seqlens, dtype, out_dtype):
        cu = _offsets(cu_seqlens)
        B, T = next(iter(xs.values())).shape[:2]
        if B != 1:
            raise RecError(f"with cu_seqlens the inputs are packed into a batch of one, got B={B}",
                           hint="concatenate the sequences along T: [1, sum(lengths), ...]")
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
            raise RecError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
        n = len(cu) - 1
        device = next(iter(xs.values())).device
        st_all = self._check_state(state, n, dtype, device)
        if getattr(self._program, "native", False):   # one launch per stage for all sequences
            o, st = self._run(xs, st_all, reverse, dtype, torch.tensor(cu, dtype=torch.int32, device=device))
            return self._pack(o, out_dtype), st
        outs, finals = [], []
        for i in range(n):
            a, b = cu[i], cu[i + 1]
            seg = {k: x[:, a:b] for k, x in xs.items()}
            st = {k: v[i:i + 1] for k, v in st_all.items()}
            if b > a:
                o, st = self._run(seg, st, reverse, dtype)
            else:
                o = None
            outs.append(o)
            finals.append(st)
        merged = {}
        for name in self.ir.outputs:
            parts = [o[name] for o in outs if o is not None]
            merged[name] = torch.cat(parts, dim=1)
        final = {k: torch.cat([f[k] for f in finals], dim=0) for k in st_all}
        return self._pack(merged, out_dtype), final

    def _pack(self, outs: dict, out_dtype):
        vals = []
        for o in self.ir.outputs:
            v = outs[o]
            if out_dtype in (torch.float16, torch.bfloat16):
                v = v.to(out_dtype)
            vals.append(v)
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _forward_graph(self, inputs: dict, edges, flip):
        """Grids and DAGs: layouts in backends/reference/graph.py (the oracle), pair inputs in
        recdsl/graph.py. Runs the compiled backend's graph kernels where it has them."""
        from . import graph as dag
        from .backends.reference import graph
        cell = self.spec.cell
        names = list(cell.inputs) + list(cell.edges) + list(cell.pairs)
        missing = [n for n in names if n not in inputs]
        unknown = [n for n in inputs if n not in names]
        if missing or unknown:
            raise RecError(f"cell {cell.name}: " + (f"missing inputs {', '.join(missing)}" if missing else
                                                     f"unknown inputs {', '.join(unknown)}"),
                           hint="inputs: " + ", ".join(names))
        for n, x in inputs.items():
            if not isinstance(x, torch.Tensor):
                raise RecError(f"input {n} must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise RecError(f"input {n} must be floating point, got {x.dtype}")
        first = inputs[next(iter(cell.inputs))] if cell.inputs else next(iter(inputs.values()))
        heads = (self.heads,) if self.heads else ()
        dtype = self._compute_dtype(inputs.values())
        xs = {n: x.to(dtype) for n, x in inputs.items()}
        grid = self.ir.over == "grid2d"
        if grid and edges is not None:
            raise RecError("edges= is for cells that run `over dag`; this one runs over grid2d")
        lead_names = ["B", "X", "Y"] if grid else ["B", "N"]
        lead = tuple(first.shape[:len(lead_names)])
        for n, var in cell.inputs.items():
            self._check_graph_input(n, xs[n], lead_names, lead, heads + self.ir.concrete(var.shape))
        B = lead[0]
        init = self.initial_state(B, dtype, first.device)
        params = {n: getattr(self, n).to(dtype) for n in cell.params}
        program = self._program if hasattr(self._program, "run_graph") else None   # torch.wavefront / level_sync
        kw = {"heads": self.heads} if self.heads else {}
        if grid:
            axes = _grid_flip(flip)
            if axes:   # scan from another corner: flip the grid, scan, flip every result back
                xs = {n: x.flip(axes) for n, x in xs.items()}
            if program is not None:
                outs, states = program.run_graph(xs, params, init, None, dtype, **kw)
            else:
                outs, states = graph.run_grid(self.ir, xs, params, init, dtype, bool(self.heads))
            if axes:
                outs = {o: v.flip(axes) for o, v in outs.items()}
                states = {s: v.flip(axes) for s, v in states.items()}
        else:
            edges = dag.as_edges(edges, lead[1])
            E = edges.shape[0]
            for n, var in cell.edges.items():
                self._check_graph_input(n, xs[n], ["B", "E"], (B, E), heads + self.ir.concrete(var.shape),
                                        what="edge input", hint=f"the edge list has E = {E} edges")
            pairs = None
            if cell.pairs:
                pairs = dag.line_pairs(edges)
                for n, var in cell.pairs.items():
                    xs[n] = self._pair_input(n, xs[n], B, E, pairs, heads + self.ir.concrete(var.shape))
            if program is not None:
                outs, states = program.run_graph(xs, params, init, edges, dtype, pairs=pairs, **kw)
            else:
                outs, states = graph.run_dag(self.ir, xs, params, init, edges, dtype, pairs=pairs, **kw)
        return self._pack(outs, first.dtype), states

    @staticmethod
    def _check_graph_input(name, x, lead_names, lead, want, what="input", hint=None):
        """x is [*lead, *want], or a RecError naming the layout."""
        layout = "[" + ", ".join(lead_names + [str(d) for d in want]) + "]"
        if x.dim() != len(lead) + len(want) or tuple(x.shape[len(lead):]) != tuple(want) \
                or tuple(x.shape[:len(lead)]) != tuple(lead):
            got = ", ".join(f"{a}={b}" for a, b in zip(lead_names, lead))
            raise RecError(f"{what} {name} has shape {list(x.shape)}, expected {layout} "
                           f"= {list(lead) + list(want)} ({got})",
                           hint=hint or f"the inputs share their leading axes [{', '.join(lead_names)}], "
                                        f"taken from the first input's")

    @staticmethod
    def _pair_input(name, x, B, E, pairs, want):
        """A pair input as [B, NP, ...] in line_pairs' order; a dense [B, E, E, ...] table
        (O(E²) memory, the caller's) is gathered into it once."""
        NP = pairs.shape[0]
        want = tuple(want)
        if x.dim() == 2 + len(want) and tuple(x.shape) == (B, NP) + want:
            return x
        if x.dim() == 3 + len(want) and tuple(x.shape) == (B, E, E) + want:
            index = pairs.to(x.device)
            return x[:, index[:, 0], index[:, 1]]
        raise RecError(f"pair input {name} has shape {list(x.shape)}, expected [B, NP"
                       + "".join(f", {d}" for d in want) + f"] = {[B, NP] + list(want)}: one value per "
                       f"(in-edge, out-edge) pair meeting at a node, NP = {NP} for these edges",
                       hint="recdsl.graph.line_pairs(edges) lists the pairs in order "
                            "(by node, then in-edge, then out-edge)")

    def step(self, state: dict | None = None, **inputs):
        """One step: inputs [B, (heads,) *shape]; returns (outputs, new state)."""
        if self._step_fn is None:
            raise RecError(f"step() runs sequence cells; this one runs over {self.ir.over}")
        (B,) = self._check_inputs(inputs, per_step=True)
        if B == 0:
            raise RecError("the inputs have an empty batch (B = 0)")
        first = next(iter(inputs.values()))
        dtype = self._compute_dtype(inputs.values())
        st = self._check_state(state, B, dtype, first.device)
        nb = 2 if self.heads else 1
        X = {n: x if x.dtype == dtype else x.to(dtype) for n, x in inputs.items()}
        # a compiled step (backends/torch: FusedStep) takes the params as stored
        params = self._stored_params(dtype) if getattr(self._step_fn, "stored_params", False) else self._params(dtype)
        st, outs = self._step_fn(X, st, params, nb, dtype, first.device)
        shaped = {}
        for o, v in outs.items():
            want = (B,) + ((self.heads,) if self.heads else ()) + self.ir.shape_of(self.ir.outputs[o])
            shaped[o] = v if tuple(v.shape) == want else v.expand(want)
        return self._pack(shaped, first.dtype), st

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in {**self.dims, **getattr(self.ir, "hypers", {})}.items())
        return f"cell={self.spec.name}, {dims}" + (f", heads={self.heads}" if self.heads else "") + \
            f", backend={self.backend_name}" + (", reverse=True" if self.default_reverse else "")


def _flag(value, name: str) -> bool:
    """A yes/no option: a bool (or a 0-dim bool tensor), never a truthy string like "no"."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        value = bool(value)
    if not isinstance(value, bool):
        raise RecError(f"{name} must be True or False, got {value!r}")
    return value


def _grid_flip(flip) -> tuple[int, ...]:
    """The axes of [B, X, Y, ...] a grid scan flips: flip=(along X, along Y), two bools."""
    if flip is None:
        return ()
    if not isinstance(flip, (tuple, list)) or len(flip) != 2:
        raise RecError(f"flip must be a pair of bools (along X, along Y), got {flip!r}"[:200],
                       hint="flip=(True, False) scans X from its last row: s.left is then the cell at x+1")
    along_x, along_y = (_flag(f, "each entry of flip") for f in flip)
    return tuple(axis for axis, on in ((1, along_x), (2, along_y)) if on)


def _offsets(cu_seqlens) -> list[int]:
    """cu_seqlens as a list of ints: an integer tensor or a sequence of ints (one meaning on
    every backend: a float is refused, never truncated)."""
    if hasattr(cu_seqlens, "__array__") and not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)   # a numpy array
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise RecError(f"cu_seqlens must hold integers, got a {cu_seqlens.dtype} tensor",
                           hint="torch.tensor([0, 5, 12], dtype=torch.int32)")
        if cu_seqlens.dim() != 1:
            raise RecError(f"cu_seqlens must be one-dimensional, got shape {list(cu_seqlens.shape)}")
        return [int(v) for v in cu_seqlens.tolist()]
    if not isinstance(cu_seqlens, (list, tuple)) or not all(_is_int(v) for v in cu_seqlens):
        raise RecError(f"cu_seqlens must be a 1-D integer tensor or a list of ints, got {cu_seqlens!r}"[:200],
                       hint="the offsets of the packed sequences, e.g. [0, 5, 12]")
    return [operator.index(v) for v in cu_seqlens]


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)   # int, numpy integers, 0-dim integer tensors
        return True
    except TypeError:
        return False


def _const(e: A.Expr, values: dict):
    """An initialiser's value (numbers, dimensions, hyper-parameters, + - * / **, elementwise
    math, arange), folded as the checker folds it (float64, never eval): a float, or a tensor
    to broadcast."""
    def lookup(name: str) -> float:
        return float(values[name])
    try:
        v = ConstFolder(lookup, max_len=MAX_NUMEL).value(e)
    except NotConstant:
        raise RecError("this initialiser is not a constant expression", e.span) from None
    return v if isinstance(v, (float, complex)) else torch.from_numpy(v)
