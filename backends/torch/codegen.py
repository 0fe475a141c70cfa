"""Plan -> the text of one `forward` function in torch, per cell (what `recdsl inspect
--stage torch` prints). Everything that reads no state, or only states of finished
stages, runs over the whole sequence at once (tensors [B, T, (heads,) *shape]); each
stage runs its kernel (scan, chunkwise form, or a tight loop over just its recurrent
core); outputs are computed after the last stage they read. Every line carries the .rec
line it came from."""
from __future__ import annotations

from recdsl.analysis import stages as S
from recdsl.ir import IRCell, Node, Op
from recdsl.plan import Plan
from recdsl.torch_expr import SourceNotes, Temps, TorchExpr, const_text, user_name

from recdsl.lowering import Choice, Selection
from recdsl.lowering.match import consumers


def _raw(n: Node) -> str:
    return f"P0[{n.arg!r}]"


class Emitter:
    BACKEND = "torch"        # named in the generated header
    EXTRA_ARGS = ""          # forward() parameters a subclass's driver adds
    def __init__(self, ir: IRCell, plan: Plan, selection: Selection):
        self.ir, self.plan, self.selection = ir, plan, selection
        self.lines: list[str] = []
        self.seq: dict[int, str] = {}        # node id -> name of its whole-sequence value
        self.temps = Temps()                 # names: the one scheme of recdsl/torch_expr.py
        self.note = SourceNotes(ir)
        self.expr_seq = TorchExpr(self.seq_name, nb="NS", raw_param=_raw)
        self.place = S.placement(ir, [s.states for s in plan.stages])
        self.users = consumers(ir)
        self.final: dict[str, str] = {}
        self.cse: dict[str, str] = {}
        self.lazy: dict[int, tuple[str, str]] = {}   # values emitted only if something reads them
        self.fused: list = []                         # FusedLoop runners of eligible loop stages
        self.shifted = False                          # some value reads a previous state shifted in time
        self.constants: dict[int, bool] = {}          # node id -> computed from constants only

    # ------------------------------------------------------------------ helpers
    def fresh(self, kind: str, hint: str | None = None) -> str:
        """A new temporary `<kind><k>[_<hint>]` (hint: the user name it computes, for the
        reader); never a user name, never another value's (recdsl/torch_expr.py)."""
        return self.temps(kind, hint)

    def emit(self, code: str, node: Node | None = None, indent: int = 1):
        line = "    " * indent + code
        note = self.note(node)
        self.lines.append(f"{line:<64}  # {note}" if note else line)

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
                self.seq[x.id] = f"X[{x.arg!r}]"
                continue
            if x.op == Op.PARAM:
                self.seq[x.id] = f"P2[{x.arg!r}]"
                continue
            if x.op == Op.STATE:
                name = self.fresh("prev", x.arg[0])
                self.shifted = True        # a previous state over the whole sequence: a shift in time
                seq_new = self.seq_name(self.ir.updates[x.arg[0]])   # bound by its stage (maybe lazily)
                self.emit(f"{name} = rt.shift({seq_new}, S0[{x.arg[0]!r}])", x)
                self.seq[x.id] = name
                continue
            rhs = self.expr_seq(x)
            if rhs in self.cse:  # the same expression built twice (e.g. by the analysis)
                self.seq[x.id] = self.cse[rhs]
                continue
            name = self.fresh("t", x.name)
            self.cse[rhs] = name
            if not x.shape and self._constant(x):
                rhs = f"torch.as_tensor({rhs}, dtype=DT, device=DEV)"   # constants only: a Python number
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
        head = [
            self.note.header(ir, self.BACKEND),
            "# X: inputs [B, T, (heads,) *shape]; S0: initial states [B, (heads,) *shape];",
            "# P1/P2: params with 1/2 leading axes; P0: params as stored; NB: per-step prefix rank.",
            f"def forward(X, S0, P0, P1, P2, NB, DT, DEV{self.EXTRA_ARGS}):",
            "    NS = NB + 1",
            "    X0 = next(iter(X.values()))",
        ]
        for sp, choice in zip(self.plan.stages, self.selection.stages):
            self.emit(f"# --- stage {sp.index}: {', '.join(sp.states)} ({sp.cls}) -> {choice.summary()}")
            self.emit(f"RAN.append({choice.kernel.name!r})  # what ran, for tests and layer.ran")
            self.stage_method(choice)(choice)
        self.emit("# --- outputs")
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
        return "\n".join(head + self.lines) + "\n"

    def stage_method(self, choice: Choice):
        """The method that emits the selected kernel (the registry names it)."""
        return getattr(self, choice.kernel.emit)

    # ------------------------------------------------------------------ stage kernels
    def _stage_vectorised(self, choice: Choice):
        for s in choice.states:
            self.seq_name(self.ir.updates[s])

    def _lifted(self, n: Node | None, rank: int, default: str) -> str:
        if n is None:
            return default
        name = self.seq_name(n)
        if n.op == Op.CONST and not n.shape:
            return f"torch.tensor({name}, dtype=DT, device=DEV)"
        return f"rt.lift({name}, {n.rank}, {rank})"

    def _stage_element(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        st = self.ir.states[s]
        upd = self.ir.updates[s]
        kind = form.kind
        a = self._lifted(form.log_a if kind == "diagexp" else form.a, st.rank, "torch.ones((), dtype=DT, device=DEV)")
        b = self._lifted(form.b, st.rank, "torch.zeros((), dtype=DT, device=DEV)"
                         if kind in ("diag", "diagexp") else "torch.tensor(float('-inf'), dtype=DT, device=DEV)")
        name = self.fresh("seq", s)
        self.emit(f"{name} = K.element_scan({kind!r}, rt.full_seq({a}, X0, NS, {st.rank}), "
                  f"rt.full_seq({b}, X0, NS, {st.rank}), S0[{s!r}])", upd)
        self.seq[upd.id] = name

    def _stage_block(self, choice: Choice):
        states = choice.states
        r = self.ir.states[states[0]].rank
        A, bs = choice.form.A, choice.form.b
        rows = []
        for i in range(len(states)):
            row = [self._lifted(A.get((i, j)), r, "None") for j in range(len(states))]
            rows.append("[" + ", ".join(row) + "]")
        xs = [f"rt.full_seq({self._lifted(bs[s], r, 'torch.zeros((), dtype=DT, device=DEV)')}, X0, NS, {r})"
              for s in states]
        names = [self.fresh("seq", s) for s in states]
        self.emit(f"{', '.join(names)}, = K.block_scan([{', '.join(rows)}], [{', '.join(xs)}], "
                  f"[{', '.join(f'S0[{s!r}]' for s in states)}])", self.ir.updates[states[0]])
        for s, n in zip(states, names):
            self.seq[self.ir.updates[s].id] = n

    def _opt(self, n: Node | None) -> str:
        return "None" if n is None else self._tensor(n)

    def _tensor(self, n: Node) -> str:
        """n's whole-sequence value as a tensor (seq_name gives a scalar constant as a literal)."""
        name = self.seq_name(n)
        return f"torch.tensor({name}, dtype=DT, device=DEV)" if n.op == Op.CONST and not n.shape else name

    def _stage_chunk_diag(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        k, v = self._tensor(form.k), self._tensor(form.v)
        g = self._opt(form.decay if form.signed else form.log_decay)
        qs = [f"({self.seq_name(r.q)}, {r.inclusive})" for r in form.readouts]
        outs, fin = self.fresh("reads"), self.fresh("fin", s)
        flip = ".transpose(-1, -2)" if form.transposed else ""   # the kernel runs on the transposed state
        kernel = "signed_decay" if form.signed else "diag_matrix_stage"
        self.emit(f"{outs}, {fin} = K.{kernel}([{', '.join(qs)}], {k}, {v}, {g}, S0[{s!r}]{flip}, X0, NS)",
                  self.ir.updates[s])
        self._bind_readouts(form.readouts, outs)
        self.final[s] = fin + flip

    def _stage_chunk_delta(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        q, k, v, beta = (self._tensor(n) for n in (form.readouts[0].q, form.k, form.v, form.beta))
        g = self._opt(form.log_decay)
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        self.emit(f"{o}, {fin} = K.delta_stage({q}, {k}, {v}, {beta}, {g}, S0[{s!r}], X0, NS)", self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _stage_chunk_delta_product(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        ks = ", ".join(self._tensor(st["k"]) for st in form.steps)
        vs = ", ".join(self._tensor(st["v"]) for st in form.steps)
        bs = ", ".join(self._tensor(st["beta"]) for st in form.steps)
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        self.emit(f"{o}, {fin} = K.delta_product_stage({self.seq_name(form.readouts[0].q)}, [{ks}], [{vs}], [{bs}], "
                  f"S0[{s!r}], X0, NS)", self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _stage_dplr(self, choice: Choice):
        form = choice.form
        s = form.states[0]
        q, k, v, a, b, g = (self._tensor(n) for n in (form.readouts[0].q, form.k, form.v, form.a, form.b,
                                                       form.log_decay))
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        self.emit(f"{o}, {fin} = K.dplr_stage({q}, {k}, {v}, {a}, {b}, {g}, S0[{s!r}], X0, NS)", self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _bind_readouts(self, readouts, outs: str):
        for i, r in enumerate(readouts):
            name = self.fresh("readout")
            extra = f" + {self.seq_name(r.extra)}" if r.extra is not None else ""   # e.g. RWKV-6's bonus r @ (u k v^T)
            self.emit(f"{name} = {outs}[{i}]{extra}", r.node)
            self.seq[r.node.id] = name

    def _stage_loop(self, choice: Choice):
        """A tight loop over the stage's recurrent core; everything else is precomputed."""
        ir, states = self.ir, list(choice.states)
        core = list(choice.form.core)
        core_ids = {n.id for n in core}
        step: dict[int, str] = {}
        pre: list[tuple[str, str, Node]] = []    # (step name, whole-sequence name) to slice per step
        svar = {s: user_name("s", s) for s in states}   # each state's value at this step
        for n in core:
            if n.op == Op.STATE:
                step[n.id] = svar[n.arg[0]]
        for n in core:
            for src in n.srcs:
                if src.id in core_ids or src.id in step:
                    continue
                if src.op == Op.STATE and src.arg[0] in states:
                    step[src.id] = svar[src.arg[0]]
                elif src.op == Op.CONST and not src.shape:
                    step[src.id] = const_text(src)
                elif src.op == Op.PARAM:
                    step[src.id] = f"P1[{src.arg!r}]"
                elif src.op in (Op.CONST, Op.EYE):
                    nm = self.fresh("c")
                    self.emit(f"{nm} = {TorchExpr(lambda x: step[x.id])(src)}", src)
                    step[src.id] = nm
                else:
                    seq = self.seq_name(src)
                    nm = self.fresh("at", src.name)   # its value at step t
                    step[src.id] = nm
                    pre.append((nm, seq, src))
        expr = TorchExpr(lambda x: step[x.id], raw_param=_raw)
        fused = self._fused(states, core)
        indent = 1
        fvar = None
        if fused is not None:
            k, fl = fused
            fvar = self.fresh("fused")
            ffin = self.fresh("fused", "final")
            args = ", ".join(self.seq_name(n) for n in fl.seqs)
            self.emit(f"{fvar} = None")
            self.emit(f"if FL[{k}].usable(DT, *X.values(), *P0.values(), *S0.values()):  # the loop in one C call")
            self.emit(f"{fvar}, {ffin} = FL[{k}].run([{args}], P0, S0, X0, NS, DT)", indent=2)
            for s in states:
                self.emit(f"{svar[s]} = {ffin}[{s!r}]", indent=2)
            self.emit("else:")
            indent = 2
        # The recurrent core as a function of (inputs at t, states at t-1, params): run_loop
        # runs it over time; with gradients its backward is a reverse loop of the core's
        # vector-Jacobian products (recomputed per step), not a graph kept for every step.
        cname = self.fresh("core")
        self.emit(f"def {cname}(ins, st, P0, P1):", indent=indent)
        if pre:
            self.emit(f"{', '.join(nm for nm, _, _ in pre)}, = ins", indent=indent + 1)
        self.emit(f"{', '.join(svar[s] for s in states)}, = st", indent=indent + 1)
        for n in core:
            if n.op == Op.STATE:
                continue
            nm = self.fresh("t", n.name)
            self.emit(f"{nm} = {expr(n)}", n, indent=indent + 1)
            step[n.id] = nm
        self.emit(f"return ({', '.join(step[ir.updates[s].id] for s in states)},)", indent=indent + 1)
        seqs = self.fresh("seqs")
        self.emit(f"{seqs} = rt.run_loop({cname}, [{', '.join(seq for _, seq, _ in pre)}], "
                  f"[{', '.join(f'S0[{s!r}]' for s in states)}], P0, X0.shape[1], NS)", indent=indent)
        for i, s in enumerate(states):
            self.emit(f"{svar[s]} = {seqs}[{i}][:, -1]", indent=indent)
        for i, s in enumerate(states):
            nm = self.fresh("seq", s)
            code = f"{nm} = {fvar}[{s!r}] if {fvar} is not None else {seqs}[{i}]" if fvar else f"{nm} = {seqs}[{i}]"
            self.lazy[ir.updates[s].id] = (nm, code)
            self.final[s] = svar[s]

    def _fused(self, states, core):
        """The fused C step for this loop stage, if it is eligible (else None)."""
        from .fused_loop import FusedLoop, NotEligible
        try:
            fl = FusedLoop(self.ir, states, core)
        except NotEligible:
            return None
        self.fused.append(fl)
        return len(self.fused) - 1, fl
