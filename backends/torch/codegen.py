"""Plan -> the text of one `forward` function in torch, per cell (what `recdsl inspect
--stage torch` prints). Everything that reads no state, or only states of finished
stages, runs over the whole sequence at once (tensors [B, T, (heads,) *shape]); each
stage runs its kernel (scan, chunkwise form, or a tight loop over just its recurrent
core); outputs are computed after the last stage they read. Every line carries the .rec
line it came from."""
from __future__ import annotations

from recdsl.analysis.stages import placement
from recdsl.ir import IRCell, Node, Op
from recdsl.plan import Plan
from recdsl.torch_expr import SourceNotes, Temps, TorchExpr, const_text, live_nodes, user_name

from recdsl.lowering import Choice, Selection
from recdsl.lowering.match import consumers

from .fused_loop import FusedLoop


# The name of the runtime helpers' module (seq_rt.py) in the generated code.
RT = "seq_rt"

# Values the forward defines first, each only if some line reads it: the sequences' prefix
# rank (B, T(, heads)) and the first input (its B and T).
HEADER = {"seq_prefix_rank": "prefix_rank + 1", "first_input": "next(iter(inputs.values()))"}


def _raw(n: Node) -> str:
    return f"params[{n.arg!r}]"


class Emitter:
    BACKEND = "torch"        # named in the generated header
    EXTRA_ARGS = ""          # forward() parameters a subclass's driver adds
    def __init__(self, ir: IRCell, plan: Plan, selection: Selection):
        self.ir, self.plan, self.selection = ir, plan, selection
        self.lines: list[str] = []
        self.seq: dict[int, str] = {}        # node id -> name of its whole-sequence value
        self.temps = Temps()                 # names: the one scheme of recdsl/torch_expr.py
        self.note = SourceNotes(ir)
        self.expr_seq = TorchExpr(self.seq_name, nb="seq_prefix_rank", raw_param=_raw, rt=RT)
        self.place = placement(ir, [s.states for s in plan.stages])
        self.users = consumers(ir)
        self.final: dict[str, str] = {}
        self.cse: dict[str, str] = {}
        self.lazy: dict[int, tuple[str, str]] = {}   # values emitted only if something reads them
        self.fused: list = []                         # FusedLoop runners of eligible loop stages
        self.shifted = False                          # some value reads a previous state shifted in time
        self.constants: dict[int, bool] = {}          # node id -> computed from constants only
        self.header_reads: set[str] = set()           # the HEADER values some line reads

    # ------------------------------------------------------------------ helpers
    def fresh(self, kind: str, hint: str | None = None) -> str:
        """A new temporary `<kind><k>[_<hint>]` (hint: the user name it computes, for the
        reader); never a user name, never another value's (recdsl/torch_expr.py)."""
        return self.temps(kind, hint)

    def emit(self, code: str, node: Node | None = None, indent: int = 1):
        line = "    " * indent + code
        note = self.note(node)
        self.lines.append(f"{line:<64}  # {note}" if note else line)

    def seq_dims(self) -> str:
        """`first_input, seq_prefix_rank`, as the kernels take the sequences' layout (B and T
        from first_input, the prefix rank seq_prefix_rank); the header defines them only if
        some line reads them."""
        self.header_reads |= {"first_input", "seq_prefix_rank"}
        return "first_input, seq_prefix_rank"

    def seq_name(self, n: Node) -> str:
        """Name of n's value over the whole sequence, emitting it (and its sources) first."""
        if n.id in self.seq:
            return self.seq[n.id]
        for x in self._pending(n):
            if x.id in self.seq:
                continue
            if x.id in self.lazy:  # a state sequence the loop kept: stack it now that it is needed
                name, code = self.lazy.pop(x.id)
                self.emit(code)
                self.seq[x.id] = name
                continue
            if x.op == Op.CONST and not x.shape:
                self.seq[x.id] = const_text(x)
                continue
            if x.op == Op.INPUT:
                self.seq[x.id] = f"inputs[{x.arg!r}]"
                continue
            if x.op == Op.PARAM:
                self.seq[x.id] = f"seq_params[{x.arg!r}]"
                continue
            if x.op == Op.STATE:
                name = self.fresh("prev", x.arg[0])
                self.shifted = True        # a previous state over the whole sequence: a shift in time
                seq_new = self.seq_name(self.ir.updates[x.arg[0]])   # bound by its stage (maybe lazily)
                self.emit(f"{name} = seq_rt.shift({seq_new}, initial[{x.arg[0]!r}])", x)
                self.seq[x.id] = name
                continue
            rhs = self.expr_seq(x)
            if rhs in self.cse:  # the same expression built twice (e.g. by the analysis)
                self.seq[x.id] = self.cse[rhs]
                continue
            name = self.fresh("t", x.name)
            self.cse[rhs] = name
            if not x.shape and self._constant(x):
                rhs = f"torch.as_tensor({rhs}, dtype=dtype, device=device)"   # constants only: a Python number
            self.emit(f"{name} = {rhs}", x)
            self.seq[x.id] = name
        return self.seq[n.id]

    def _constant(self, n: Node) -> bool:
        """n is computed from constants only (its text is a Python number expression).
        Sources first with an explicit stack (no recursion along long chains)."""
        todo = [(n, False)]
        while todo:
            x, ready = todo.pop()
            if x.id in self.constants:
                continue
            if ready or x.op == Op.CONST or not x.srcs:
                self.constants[x.id] = x.op == Op.CONST or (bool(x.srcs) and all(self.constants[s.id] for s in x.srcs))
                continue
            todo.append((x, True))
            todo.extend((s, False) for s in x.srcs if s.id not in self.constants)
        return self.constants[n.id]

    def _pending(self, n: Node) -> list[Node]:
        """n and the sources it needs that have no value yet, sources first (the search
        stops at values already bound, e.g. fused readouts, so their inputs are not built)."""
        order, seen, stack = [], set(), [(n, False)]
        while stack:
            x, done = stack.pop()
            if done:
                order.append(x)
                continue
            if x.id in seen or x.id in self.seq:
                continue
            seen.add(x.id)
            stack.append((x, True))
            if x.id in self.lazy:
                continue
            stack.extend((s, False) for s in reversed(self.expr_seq.deps(x)) if s.id not in self.seq)
        return order

    # ------------------------------------------------------------------ program
    def program(self) -> str:
        ir = self.ir
        for sp, choice in zip(self.plan.stages, self.selection.stages):
            self.emit(f"# --- stage {sp.index}: {', '.join(sp.states)} ({sp.cls}) -> {choice.summary()}")
            self.emit(f"ran.append({choice.kernel.name!r})  # what ran, for tests and layer.ran")
            self.stage_method(choice)(choice)
        self.emit("# --- outputs")
        self.outputs_epilogue()
        # a constant output (`output 7`) is a number in the code: returned as a tensor
        outs = {o: self.expr_seq.operand(n, 0, as_tensor=True) if n.op == Op.CONST and not n.shape
                else self.seq_name(n) for o, n in ir.outputs.items()}
        for s in ir.states:
            if s not in self.final:
                self.final[s] = f"{self.seq[ir.updates[s].id]}[:, -1]"
        finals = ", ".join(f"{s!r}: {v}" for s, v in self.final.items())
        self.emit(f"return {{{', '.join(f'{o!r}: {v}' for o, v in outs.items())}}}, {{{finals}}}")
        for fl in self.fused:  # a fused loop writes only the state sequences something read
            fl.keep = {s for s in fl.states if ir.updates[s].id not in self.lazy}
        head = [
            self.note.header(ir, self.BACKEND),
            "# inputs [B, T, (heads,) *shape]; initial: the initial states [B, (heads,) *shape];",
            "# params: as stored; step_params / seq_params: with 1 (batch) / 2 (batch, time) leading axes,",
            "# laid out as a step's / the sequence's tensors; prefix_rank: a step's prefix axes, [B(, heads)]",
            "# (seq_prefix_rank = prefix_rank + 1: [B, T(, heads)]).",
            "def forward(inputs, initial, params, step_params, seq_params, prefix_rank, dtype, device"
            f"{self.EXTRA_ARGS}):",
        ]
        if self.expr_seq.nb_read:
            self.header_reads.add("seq_prefix_rank")
        head += [f"    {name} = {rhs}" for name, rhs in HEADER.items() if name in self.header_reads]
        return "\n".join(head + self.lines) + "\n"

    def outputs_epilogue(self):
        """Where a backend computes the outputs' remaining math in kernels of its own (the
        triton backend: one generated kernel); here each op is one torch operator, emitted
        as the return line reads it."""

    def stage_method(self, choice: Choice):
        """The method that emits the selected kernel (the registry names it)."""
        return getattr(self, choice.kernel.emit)

    # ------------------------------------------------------------------ stage kernels
    def _stage_vectorised(self, choice: Choice):
        for s in choice.states:
            self.seq_name(self.ir.updates[s])

    def _stage_graph(self, choice: Choice):
        """Grids and DAGs (torch.wavefront / torch.level_sync) run in graph.py, not in
        generated sequence code: build() makes a GraphProgram for them."""
        self.emit(f"raise RuntimeError('over {self.ir.over}: {choice.kernel.name} runs in backends/torch/graph.py')")

    def _lifted(self, n: Node | None, rank: int, default: str) -> str:
        if n is None:
            return default
        name = self.seq_name(n)
        if n.op == Op.CONST and not n.shape:
            return f"torch.tensor({name}, dtype=dtype, device=device)"
        return f"seq_rt.lift({name}, {n.rank}, {rank})"

    def _stage_element(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        st = self.ir.states[s]
        upd = self.ir.updates[s]
        kind = form.kind
        a = self._lifted(form.log_a if kind == "diagexp" else form.a, st.rank,
                         "torch.ones((), dtype=dtype, device=device)")
        b = self._lifted(form.b, st.rank, "torch.zeros((), dtype=dtype, device=device)"
                         if kind in ("diag", "diagexp") else "torch.tensor(float('-inf'), dtype=dtype, device=device)")
        name = self.fresh("seq", s)
        self.emit(f"{name} = scans.element_scan({kind!r}, seq_rt.full_seq({a}, {self.seq_dims()}, {st.rank}), "
                  f"seq_rt.full_seq({b}, {self.seq_dims()}, {st.rank}), initial[{s!r}])", upd)
        self.seq[upd.id] = name

    def _stage_dense_semiring(self, choice: Choice):
        """A dense semiring stage (HMM forward, Viterbi): semiring.py, the form's variant."""
        form = choice.form
        s = form.states[0]
        upd = self.ir.updates[s]
        A = self._lifted(form.A, 2, "")
        b = self._lifted(form.b, 1, "None")
        name = self.fresh("seq", s)
        call = self.form_stage(choice, "semiring", "dense_semiring_stage")
        self.emit(f"{name} = {call}({form.kind!r}, {A}, {b}, initial[{s!r}], {self.seq_dims()}, "
                  f"products={form.products}, ran=ran)", upd)
        self.seq[upd.id] = name

    def _stage_block(self, choice: Choice):
        states = choice.states
        r = self.ir.states[states[0]].rank
        A, bs = choice.form.A, choice.form.b
        rows = []
        for i in range(len(states)):
            row = [self._lifted(A.get((i, j)), r, "None") for j in range(len(states))]
            rows.append("[" + ", ".join(row) + "]")
        zero = "torch.zeros((), dtype=dtype, device=device)"
        xs = [f"seq_rt.full_seq({self._lifted(bs[s], r, zero)}, {self.seq_dims()}, {r})" for s in states]
        names = [self.fresh("seq", s) for s in states]
        self.emit(f"{', '.join(names)}, = scans.block_scan([{', '.join(rows)}], [{', '.join(xs)}], "
                  f"[{', '.join(f'initial[{s!r}]' for s in states)}])", self.ir.updates[states[0]])
        for s, n in zip(states, names):
            self.seq[self.ir.updates[s].id] = n

    def _opt(self, n: Node | None) -> str:
        return "None" if n is None else self._tensor(n)

    def _tensor(self, n: Node) -> str:
        """n's whole-sequence value as a tensor (seq_name gives a scalar constant as a literal)."""
        name = self.seq_name(n)
        return f"torch.tensor({name}, dtype=dtype, device=device)" if n.op == Op.CONST and not n.shape else name

    def _stage_chunk_diag(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        k, v = self._tensor(form.k), self._tensor(form.v)
        g = self._opt(form.decay if form.signed else form.log_decay)
        qs = [f"({self.seq_name(r.q)}, {r.inclusive})" for r in form.readouts]
        outs, fin = self.fresh("reads"), self.fresh("fin", s)
        flip = ".transpose(-1, -2)" if form.transposed else ""   # the kernel runs on the transposed state
        kernel = "signed_decay" if form.signed else "diag_matrix_stage"
        self.emit(f"{outs}, {fin} = scans.{kernel}([{', '.join(qs)}], {k}, {v}, {g}, initial[{s!r}]{flip}, "
                  f"{self.seq_dims()})", self.ir.updates[s])
        self._bind_readouts(form.readouts, outs)
        self.final[s] = fin + flip

    def form_stage(self, choice: Choice, module: str, name: str) -> str:
        """The function a matrix-state or semiring stage calls (the driver's record `ran=ran`
        its last argument): torch's `name` of backends/torch/<module>.py (scans.py is `K`). A
        backend with kernels of its own for these forms overrides this (TritonEmitter), and
        keeps the operands, bindings and final states of the methods here."""
        if module == "scans":
            return f"scans.{name}"
        self.emit(f"from {__package__}.{module} import {name}")
        return name

    def _stage_chunk_delta(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        q, k, v, beta = (self._tensor(n) for n in (form.readouts[0].q, form.k, form.v, form.beta))
        g = self._opt(form.log_decay)
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        call = self.form_stage(choice, "scans", "delta_stage")
        self.emit(f"{o}, {fin} = {call}({q}, {k}, {v}, {beta}, {g}, initial[{s!r}], {self.seq_dims()}, ran=ran)",
                  self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _stage_chunk_delta_product(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        ks = ", ".join(self._tensor(st["k"]) for st in form.steps)
        vs = ", ".join(self._tensor(st["v"]) for st in form.steps)
        bs = ", ".join(self._tensor(st["beta"]) for st in form.steps)
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        call = self.form_stage(choice, "scans", "delta_product_stage")
        self.emit(f"{o}, {fin} = {call}({self.seq_name(form.readouts[0].q)}, [{ks}], [{vs}], [{bs}], "
                  f"initial[{s!r}], {self.seq_dims()}, ran=ran)", self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _stage_dplr(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        q, k, v, a, b, g = (self._tensor(n) for n in (form.readouts[0].q, form.k, form.v, form.a, form.b,
                                                       form.log_decay))
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        call = self.form_stage(choice, "scans", "dplr_stage")
        self.emit(f"{o}, {fin} = {call}({q}, {k}, {v}, {a}, {b}, {g}, initial[{s!r}], {self.seq_dims()}, ran=ran)",
                  self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _bind_readouts(self, readouts, outs: str):
        for i, r in enumerate(readouts):
            name = self.fresh("readout")
            extra = f" + {self.seq_name(r.extra)}" if r.extra is not None else ""   # e.g. RWKV-6's bonus r @ (u k v^T)
            self.emit(f"{name} = {outs}[{i}]{extra}", r.node)
            self.seq[r.node.id] = name

    def _stage_loop(self, choice: Choice):
        """A tight torch loop over the stage's recurrent core; everything else is precomputed."""
        states, core = list(choice.states), list(choice.form.core)
        self._emit_torch_loop(states, core, _StepFunction(self, states, core), indent=1, fvar=None)

    def _stage_c_loop(self, choice: Choice):
        """The stage's whole time loop in one generated C call (forward and backward). The
        torch loop stays behind it for what C cannot run (a GPU tensor, a build that
        failed): then `ran` records that the torch loop ran."""
        from .kernels import compiled_loop
        states, core = list(choice.states), list(choice.form.core)
        fl, reads = compiled_loop(self.ir, states, core), []
        if not isinstance(fl, FusedLoop):
            fl, reads = self._with_readouts(choice, fl)
        for fold in fl.folds.values():
            self._bind_folded(fold)
        fn = None if reads else _StepFunction(self, states, core)   # binds the values the torch step reads
        self.fused.append(fl)
        k = len(self.fused) - 1
        fvar, ffin = self.fresh("fused"), self.fresh("fused", "final")
        args = ", ".join(self.seq_name(n) for n in fl.seq_args)
        self.header_reads |= {"first_input", "seq_prefix_rank"}   # fused_loops[k].run reads them
        self.emit(f"{fvar} = None")
        self.emit(f"if fused_loops[{k}].usable(dtype, *inputs.values(), *params.values(), *initial.values()):"
                  "  # the loop in one C call")
        folds = list(fl.folds.values())   # the run computes these projections: their .rec line
        self.emit(f"{fvar}, {ffin} = fused_loops[{k}].run([{args}], params, initial, first_input, seq_prefix_rank, "
                  "dtype)", folds[0].seq if folds else None, indent=2)
        if fn is not None:
            for s in states:
                self.emit(f"{fn.svar[s]} = {ffin}[{s!r}]", indent=2)
        self.emit("else:")
        self.emit("ran[-1] = 'torch.loop'  # not CPU float32/float64, or the C did not build (warned)", indent=2)
        if fn is not None:
            self._emit_torch_loop(states, core, fn, indent=2, fvar=fvar)
            return
        # readouts in the loop: the torch loop over the same IR returns what the C call does
        self.emit(f"{fvar}, {ffin} = fused_loops[{k}].run_torch([{args}], params, initial, first_input, "
                  "seq_prefix_rank, dtype)", indent=2)
        for s in states:
            nm = self.fresh("seq", s)
            self.lazy[self.ir.updates[s].id] = (nm, f"{nm} = {fvar}[{s!r}]")
            self.final[s] = f"{ffin}[{s!r}]"
        for i, r in enumerate(reads):
            name = self.fresh("readout")
            self.emit(f"{name} = {fvar}[{i}]", r)
            self.seq[r.id] = name

    def _bind_folded(self, fold):
        """A projection W @ x + b that the C loop computes itself (fused_loop.plan_folds): the
        loop is given x; the projection is only built where the torch loop runs instead, so
        its name stands for the expression, written where it is read."""
        x = self.seq_name(fold.x)
        parts = [f"params[{fold.weight.arg!r}]", x] + [f"params[{b.arg!r}]" for b in fold.biases]
        self.seq[fold.seq.id] = (f"seq_rt.param_linear({', '.join(parts)})" if fold.biases
                                 else f"seq_rt.param_matvec({parts[0]}, {x})")

    def _with_readouts(self, choice: Choice, loop):
        """(the general loop with the outputs it can compute per step, those outputs): the
        outputs that read this stage's new states and no later stage (q @ M'), so that the
        loop never writes a matrix state's sequence only they would read."""
        from .fused_loop import NotEligible
        from .kernels import compiled_loop
        updates = {self.ir.updates[s].id for s in choice.states}
        reads = [n for n in self.ir.outputs.values() if self.place.get(n.id) == choice.stage
                 and n.id not in updates and n.op != Op.STATE and n.id not in self.seq]
        if not reads:
            return loop, []
        try:
            return compiled_loop(self.ir, choice.states, choice.form.core, readouts=reads), reads
        except NotEligible:
            return loop, []

    def _emit_torch_loop(self, states: list[str], core: list[Node], fn: "_StepFunction", indent: int, fvar: str | None):
        ir, svar = self.ir, fn.svar
        # The recurrent core as a function of (inputs at t, states at t-1, params): run_loop
        # runs it over time; with gradients its backward is a reverse loop of the core's
        # vector-Jacobian products (recomputed per step), not a graph kept for every step.
        # What is the same at every step (constant tensors) is made once, before the loop.
        cname = self.fresh("core")
        once, body, returns = fn.build()
        for code, n in once:
            self.emit(code, n, indent=indent)
        self.emit(f"def {cname}(ins, st, params, step_params):", indent=indent)
        if fn.pre:
            self.emit(f"{', '.join(nm for nm, _ in fn.pre)}, = ins", indent=indent + 1)
        self.emit(f"{', '.join(fn.state_targets())}, = st", indent=indent + 1)
        for code, n in body:
            self.emit(code, n, indent=indent + 1)
        self.emit(f"return ({', '.join(returns)},)", indent=indent + 1)
        seqs = self.fresh("seqs")
        self.header_reads.add("first_input")
        params = ", ".join(f"{p!r}: params[{p!r}]" for p in fn.params)   # only those the core reads
        self.emit(f"{seqs} = seq_rt.run_loop({cname}, [{', '.join(seq for _, seq in fn.pre)}], "
                  f"[{', '.join(f'initial[{s!r}]' for s in states)}], {{{params}}}, first_input.shape[1])",
                  indent=indent)
        for i, s in enumerate(states):
            self.emit(f"{svar[s]} = {seqs}[{i}][:, -1]", indent=indent)
        for i, s in enumerate(states):
            nm = self.fresh("seq", s)
            code = f"{nm} = {fvar}[{s!r}] if {fvar} is not None else {seqs}[{i}]" if fvar else f"{nm} = {seqs}[{i}]"
            self.lazy[ir.updates[s].id] = (nm, code)
            self.final[s] = svar[s]


class _StepFunction:
    """The per-step function (`core`) of a torch loop stage, built before it is emitted.

    Only the core values the new states need are written (live_nodes over TorchExpr.deps:
    the W @ h that F.linear(h, W, b) absorbs is not computed beside it), and only the
    inputs, states and params those read reach the function. What is the same at every
    step is made once per forward, outside it: constant tensors (a `torch.tensor(0.0)`
    operand, a vector constant, an identity) and core values computed from constants only.
    Params are read as `params` (as stored, for one GEMM) or `step_params` (one leading axis): views
    run_loop builds once per loop, of the params in `params` only."""

    def __init__(self, em: Emitter, states: list[str], core: list[Node]):
        self.em, self.ir = em, em.ir
        self.core_ids = {n.id for n in core}
        self.svar = {s: user_name("s", s) for s in states}   # each state's value at this step
        self.step: dict[int, str] = {}        # node id -> its name in the function (or made once, outside)
        self.pre: list[tuple[str, str]] = []  # (name at the step, whole-sequence name) of each input
        self.params: list[str] = []           # the params the function reads
        self.once: list[tuple[str, Node]] = []   # lines run once per forward, before the loop
        self.consts: dict[str, str] = {}      # scalar literal -> its tensor, made once
        self.states_read: set[str] = set()
        self.expr = TorchExpr(self.name, raw_param=self.raw, const_tensor=self.const_tensor, rt=RT)
        self.roots = [self.ir.updates[s] for s in states]
        self.live = live_nodes(core, self.roots, self.expr.deps)
        for n in self.live + self.roots:   # the whole-sequence values read: emitted now, before the loop
            for src in (self.expr.deps(n) if n.id in self.core_ids else (n,)):
                if src.id not in self.core_ids and src.id not in self.step and self._per_step(src):
                    seq = em.seq_name(src)
                    self.step[src.id] = em.fresh("at", src.name)   # its value at step t
                    self.pre.append((self.step[src.id], seq))

    def _per_step(self, n: Node) -> bool:
        """n is read at each step from a whole-sequence value (not a state of this stage, a
        param or a constant)."""
        if n.op == Op.STATE and n.arg[0] in self.svar:
            return False
        return n.op not in (Op.PARAM, Op.CONST, Op.EYE)

    # names the expressions read (TorchExpr's callbacks)
    def name(self, n: Node) -> str:
        if n.id in self.step:
            return self.step[n.id]
        if n.op == Op.STATE and n.arg[0] in self.svar:
            self.states_read.add(n.arg[0])
            return self.svar[n.arg[0]]
        if n.op == Op.CONST and not n.shape:
            return const_text(n)
        if n.op == Op.PARAM:
            self._use(n.arg)
            return f"step_params[{n.arg!r}]"
        if n.op in (Op.CONST, Op.EYE):   # a constant tensor: made once
            nm = self.em.fresh("c")
            self.once.append((f"{nm} = {self.expr(n)}", n))
            self.step[n.id] = nm
            return nm
        raise KeyError(f"no value bound for {n!r} in the loop's step")   # pragma: no cover - bound in __init__

    def raw(self, n: Node) -> str:
        self._use(n.arg)
        return f"params[{n.arg!r}]"

    def const_tensor(self, n: Node) -> str:
        text = const_text(n)
        if text not in self.consts:
            self.consts[text] = self.em.fresh("c")
            self.once.append((f"{self.consts[text]} = torch.tensor({text}, dtype=dtype, device=device)", n))
        return self.consts[text]

    def _use(self, param: str):
        if param not in self.params:
            self.params.append(param)

    # the function
    def build(self):
        """(lines made once before the loop, the step's lines, the names of the new states);
        each line a (code, node) pair."""
        body: list[tuple[str, Node]] = []
        constant: dict[int, bool] = {}    # core value computed from constants only (no input, state or param)
        for n in self.live:
            if n.op == Op.STATE or (n.op == Op.CONST and not n.shape):
                constant[n.id] = n.op == Op.CONST
                continue
            constant[n.id] = n.op in (Op.CONST, Op.EYE) or bool(n.srcs) and all(
                constant.get(s.id, False) if s.id in self.core_ids else s.op in (Op.CONST, Op.EYE) for s in n.srcs)
            rhs = self.expr(n)
            if constant[n.id]:
                nm = self.em.fresh("c", n.name)
                self.once.append((f"{nm} = {rhs}", n))
            else:
                nm = self.em.fresh("t", n.name)
                body.append((f"{nm} = {rhs}", n))
            self.step[n.id] = nm
        returns = [self.name(u) for u in self.roots]
        return self.once, body, returns

    def state_targets(self) -> list[str]:
        """The unpacking of the states at t-1: `_` for a state the step does not read."""
        return [v if s in self.states_read else "_" for s, v in self.svar.items()]
