"""Plan -> the triton backend's two texts: the Triton kernel module (`recdsl inspect
--stage triton`) and the torch driver that launches it.

The driver is the torch backend's whole-sequence forward (hoisted matmuls stay one GEMM
over B*T, cuBLAS on a GPU) with each linear stage's kernel replaced by a generated Triton
scan whose prologue computes the stage's coefficients from the leaves, and each
sequential stage by a generated Triton loop (`seq_kernels`). Which stage runs what is the
selection's (kernels.py is the registry): stages whose form has no Triton kernel run the
torch kernel registered as the fallback, and the plan says so."""
from __future__ import annotations

from ..torch.codegen import Emitter
from recdsl.ir import Node, Op
from recdsl.lowering import Choice, ChunkDiag
from recdsl.lowering.match import stage_core

from . import texpr
from .fusion import kernel_name, pow2
from .scan_kernels import ScanKernel, ScanSpec


class TritonEmitter(Emitter):
    BACKEND = "triton"
    EXTRA_ARGS = ", reverse=False, cu_seqlens=None"    # reverse and cu_seqlens, passed to the kernels
    def __init__(self, ir, plan, selection):
        super().__init__(ir, plan, selection)
        self.kernels: list = []            # ScanKernel / SeqKernel, in stage order
        self.cores = [stage_core(ir, sp.states, self.place, sp.index) for sp in plan.stages]
        self.store_marks: dict[int, list] = {}  # kernel -> its states (whose sequences may go unwritten)

    def program(self) -> str:
        """The driver; a kernel writes a state sequence only if the driver reads it (the
        Emitter's lazy values that were never bound) or a gradient needs it (at run time)."""
        text = super().program()
        if self.shifted and self.selection.native:   # select's structural check missed a shift: a bug, loudly
            raise AssertionError(f"{self.ir.name}: the driver shifts a state but the selection hands "
                                 "reverse/cu_seqlens to the kernels")
        for idx, states in self.store_marks.items():
            read = tuple(self.ir.updates[s].id not in self.lazy for s in states)
            per_state = not isinstance(self.kernels[idx], ScanKernel)
            text = text.replace(f"@STORE{idx}@", repr(read) if per_state else str(any(read)))
        return text

    def _bind_sequences(self, idx: int, states: list, seqs: str, fins: str):
        """The stage's final states, and its state sequences as lazy values: emitted (and
        written by the kernel) only if something reads them."""
        self.store_marks[idx] = list(states)
        for i, s in enumerate(states):
            name = self.fresh("seq", s)
            self.lazy[self.ir.updates[s].id] = (name, f"{name} = {seqs}[{i}]")
            self.final[s] = f"{fins}[{i}]"

    def stage_method(self, choice: Choice):
        """A Triton kernel's method is this class's own; a torch one only when the registry
        entry says it is borrowed (never inherited by accident)."""
        if choice.kernel.borrowed != "torch" and choice.kernel.emit not in type(self).__dict__:
            raise AssertionError(f"{choice.kernel.name} has no triton emitter")   # a registry bug
        return getattr(self, choice.kernel.emit)

    # ------------------------------------------------------------------ scans
    def _scan(self, choice: Choice, spec: ScanSpec):
        sp = self.plan.stages[choice.stage]
        ir = self.ir
        spec.updates = [ir.updates[s] for s in sp.states]
        spec.opaque = {n.id for k, core in enumerate(self.cores) if k != sp.index for n in core}
        self._plan_epilogue(sp, spec)
        kern = ScanKernel(spec, self.note)
        idx = len(self.kernels)
        self.kernels.append(kern)
        leaves = ", ".join(x.view_text(self.seq_name(x.node)) for x in kern.leaves)
        rleaves = ", ".join(x.view_text(self.seq_name(x.node)) for x in kern.rleaves)
        shape = ir.shape_of(ir.states[sp.states[0]])
        seqs, fins, outs, reds = self.fresh("seqs"), self.fresh("finals"), self.fresh("outs"), self.fresh("reads")
        h0s = ", ".join(f"initial[{s!r}]" for s in sp.states)
        self.emit(f"{seqs}, {fins}, {outs}, {reds} = launch.scan(stage_kernels[{idx}], [{leaves}], [{rleaves}], "
                  f"[{h0s}], {self.seq_dims()}, {shape!r}, store=@STORE{idx}@, rev=reverse, cu=cu_seqlens)"
                  f"  # triton kernel {spec.name}_fwd",
                  ir.updates[sp.states[0]])
        self._bind_sequences(idx, sp.states, seqs, fins)
        for i, o in enumerate(spec.outputs):
            self.seq[o.id] = f"{outs}[{i}]"
        for j, o in enumerate(spec.reduced):
            self.seq[o.id] = f"{reds}[{j}]"

    def _ready(self, n, stage: int) -> bool:
        """n can be read by a kernel of `stage`: it needs no state of this stage or later. (A
        node made here, such as a readout's q[:, None], is placed by its sources.)"""
        while n.id not in self.place and len(n.srcs) == 1:
            n = n.srcs[0]
        return self.place.get(n.id, -1) < stage

    def _plan_epilogue(self, sp, spec: ScanSpec):
        """The outputs this scan computes in its epilogue (see scan_kernels): those elementwise
        in its new states, and h' @ q readouts of a [.., N] state with what follows them."""
        from .fusion import Region
        ir = self.ir
        upd = {u.id: i for i, u in enumerate(spec.updates)}
        state_shape = ir.shape_of(spec.updates[0])
        pending = [o for o in ir.outputs.values() if o.id not in self.seq]
        if spec.kind == "diag" and spec.k == 1 and len(state_shape) == 2:
            u = spec.updates[0]
            for n in self.ir.nodes():
                found = _readout(n, u)
                if found and self._ready(found[0], sp.index) and all(n is not r for r, _, _ in spec.readouts):
                    q, rax = found
                    if not spec.readouts:
                        spec.rax = rax
                    if rax == spec.rax:   # one reduced axis per kernel
                        spec.readouts.append((n, 0, q))
        reads = {r.id for r, _, _ in spec.readouts}
        red_shape = state_shape[:-1] if spec.rax == 2 else state_shape[1:]
        for o in pending:
            if o.id in upd or (texpr.fusable(o) and ir.shape_of(o) == state_shape):
                reg = Region([o], set(upd))
                if reg.ok and reg.stops_hit and all(self._ready(x.node, sp.index) for x in reg.leaves):
                    spec.outputs.append(o)
            elif spec.readouts and ir.shape_of(o) == red_shape and (o.id in reads or texpr.fusable(o)):
                reg = Region([o], reads)
                if reg.ok and reg.stops_hit and all(self._ready(x.node, sp.index) and x.id not in upd
                                                    for x in reg.leaves):
                    spec.reduced.append(o)
        if spec.readouts:
            spec.n_p2 = pow2(state_shape[spec.rax - 1])
        # readouts nothing reduced reads are not worth the readout mode
        used = {x for o in spec.reduced for x in Region([o], reads).stops_hit}
        spec.readouts = [r for r in spec.readouts if r[0].id in used]
        if not spec.readouts:
            spec.reduced = []

    def _stage_element(self, choice: Choice):
        form = choice.form
        kind = form.kind
        a, b = form.a, form.b
        if kind == "diagexp" and a.op == Op.CONST:   # a constant decay as written: exact in any dtype
            kind = "diag"
        if kind == "diagexp":  # the decay as exp(log a): the exponential is one more prologue op
            a = Node(Op.EXP, (form.log_a,), form.log_a.shape, span=form.log_a.span)
            kind = "diag"
        name = kernel_name(self.ir.name, form.stage, form.states[:1])
        self._scan(choice, ScanSpec(name, kind, 1, [[a]], [b], list(form.states)))

    def _stage_block(self, choice: Choice):
        states = list(choice.states)
        A = [[choice.form.A.get((i, j)) for j in range(len(states))] for i in range(len(states))]
        b = [choice.form.b.get(s) for s in states]
        name = kernel_name(self.ir.name, choice.stage, states)
        self._scan(choice, ScanSpec(name, "block", len(states), A, b, states))

    # Hoisted values: torch ops over B*T in the driver (one GEMM per projection, cuBLAS).
    _stage_vectorised = Emitter._stage_vectorised

    def _torch_loop(self, choice: Choice):
        """The torch backend's loop (registered as this backend's fallback for loops its
        sequential kernel does not take)."""
        Emitter._stage_loop(self, choice)

    def _stage_loop(self, choice: Choice):
        from .seq_kernels import SeqKernel
        sp = self.plan.stages[choice.stage]
        kern = SeqKernel(self.ir, sp, list(choice.form.core), self.note)   # eligible: select asked seq_kernels
        idx = len(self.kernels)
        self.kernels.append(kern)
        leaves = ", ".join(self.seq_name(x) for x in kern.leaves)
        seqs, fins = self.fresh("seqs"), self.fresh("finals")
        h0s = ", ".join(f"initial[{s!r}]" for s in sp.states)
        self.emit(f"{seqs}, {fins} = launch.seq(stage_kernels[{idx}], [{leaves}], [{h0s}], params, {self.seq_dims()}, "
                  f"rev=reverse, cu=cu_seqlens, store=@STORE{idx}@)  # triton kernel {kern.name}_fwd",
                  self.ir.updates[sp.states[0]])
        self._bind_sequences(idx, sp.states, seqs, fins)

    def _triton_chunk_diag(self, choice: Choice):
        """A ChunkDiag stage (log decay: the registry declines a signed one) on the Triton
        chunkwise kernels of chunk_kernels.py, called as the torch backend calls its form."""
        self._operand_prologue(choice)
        form = choice.form
        s = form.states[0]
        k, v = self._tensor(form.k), self._tensor(form.v)
        g = self._opt(form.decay if form.signed else form.log_decay)
        stage = "signed_matrix_stage" if form.signed else "diag_matrix_stage"   # signed: log|d| and its sign
        qs = [self._scaled_readout(r) for r in form.readouts]
        outs, fin = self.fresh("reads"), self.fresh("fin", s)
        flip = ".transpose(-1, -2)" if form.transposed else ""   # the kernels run on the transposed state
        self.emit(f"from {__package__}.chunk_kernels import {stage} as chunk_diag_stage")
        self.emit(f"{outs}, {fin} = chunk_diag_stage([{', '.join(qs)}], {k}, {v}, {g}, initial[{s!r}]{flip}, "
                  f"{self.seq_dims()}, ran=ran, rev=reverse, cu=cu_seqlens)  # triton kernels chunk_diag_*",
                  self.ir.updates[s])
        self._bind_readouts(form.readouts, outs)
        self.final[s] = fin + flip

    def _scaled_readout(self, readout) -> str:
        """A ChunkDiag readout as chunk_kernels takes it: (x, inclusive, c) when its q is x * c
        with c a scalar constant not yet computed (the kernels scale the output tile, and do in
        the backward: no torch op over q), else (q, inclusive)."""
        scaled = self._query_scale(readout.q)
        if scaled:
            return f"({self.seq_name(scaled[0])}, {readout.inclusive}, {scaled[1]})"
        return f"({self.seq_name(readout.q)}, {readout.inclusive})"

    def _query_scale(self, q: Node):
        """(x, c) when the readout query q is x * c, c a scalar constant, and q not computed yet."""
        if q.id not in self.seq and q.op == Op.MUL:
            for x, c in (q.srcs, q.srcs[::-1]):
                scale = texpr.literal(c)
                if scale is not None and self.ir.shape_of(x) == self.ir.shape_of(q):
                    return x, scale
        return None

    # The forms whose torch emitters (operands, readouts, final states) run unchanged on this
    # backend's own kernels: form_stage names the kernel module's stage function instead.
    OWN_STAGES = {"delta_stage": "delta_kernels", "delta_product_stage": "delta_kernels",
                  "dplr_stage": "dplr_kernels", "dense_semiring_stage": "semiring_kernels"}

    # The kernels whose module is not the form's usual one (OWN_STAGES) for the same stage function.
    KERNEL_STAGES = {"triton.chunk_dplr": "chunk_dplr_kernels"}

    def form_stage(self, choice: Choice, module: str, name: str) -> str:
        if choice.kernel.borrowed:
            return super().form_stage(choice, module, name)
        own = self.KERNEL_STAGES.get(choice.kernel.name, self.OWN_STAGES[name])
        self.emit(f"from {__package__}.{own} import {name} as triton_{name}")
        return f"triton_{name}"

    def _triton_dplr(self, choice: Choice):
        """KDA, RWKV-7 on dplr_kernels.py (the fused recurrence)."""
        self._operand_prologue(choice)
        self._stage_dplr(choice)

    def _triton_chunk_dplr(self, choice: Choice):
        """KDA, RWKV-7 on chunk_dplr_kernels.py (the chunkwise WY/UT form), called as the torch
        backend calls its form, with the direction and cu_seqlens (the kernels index time themselves)."""
        self._operand_prologue(choice)
        form = choice.form
        s = form.states[0]
        q, k, v, a, b, g = (self._tensor(n) for n in (form.readouts[0].q, form.k, form.v, form.a, form.b,
                                                       form.log_decay))
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        call = self.form_stage(choice, "scans", "dplr_stage")
        self.emit(f"{o}, {fin} = {call}({q}, {k}, {v}, {a}, {b}, {g}, initial[{s!r}], {self.seq_dims()}, ran=ran, "
                  f"rev=reverse, cu=cu_seqlens)  # triton kernels chunk_dplr_*", self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _triton_dense_semiring(self, choice: Choice):
        """HMM forward, Viterbi on semiring_kernels.py (the streamed loop)."""
        self._stage_dense_semiring(choice)

    def _triton_chunk_delta(self, choice: Choice):
        """DeltaNet, Gated DeltaNet on delta_kernels.py, called as the torch backend calls its
        form, with the direction and cu_seqlens (the kernels index time themselves)."""
        self._operand_prologue(choice)
        form = choice.form
        s = form.states[0]
        q, k, v, beta = (self._tensor(n) for n in (form.readouts[0].q, form.k, form.v, form.beta))
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        call = self.form_stage(choice, "scans", "delta_stage")
        self.emit(f"{o}, {fin} = {call}({q}, {k}, {v}, {beta}, {self._opt(form.log_decay)}, initial[{s!r}], "
                  f"{self.seq_dims()}, ran=ran, rev=reverse, cu=cu_seqlens)  # triton kernels delta_*",
                  self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _triton_delta_product(self, choice: Choice):
        """DeltaProduct: its steps interleaved onto delta_kernels.py's kernels, with the direction
        and cu_seqlens (the kernels index time themselves; a token's steps laid out for them)."""
        self._operand_prologue(choice)
        form = choice.form
        s = form.states[0]
        ks, vs, bs = (", ".join(self._tensor(st[part]) for st in form.steps) for part in ("k", "v", "beta"))
        o, fin = self.fresh("reads"), self.fresh("fin", s)
        call = self.form_stage(choice, "scans", "delta_product_stage")
        self.emit(f"{o}, {fin} = {call}({self.seq_name(form.readouts[0].q)}, [{ks}], [{vs}], [{bs}], initial[{s!r}], "
                  f"{self.seq_dims()}, ran=ran, rev=reverse, cu=cu_seqlens)  # triton kernels delta_*",
                  self.ir.updates[s])
        self._bind_readouts(form.readouts, f"[{o}]")
        self.final[s] = fin

    def _triton_wavefront(self, choice: Choice):
        """A grid runs in grid_kernels.GridProgram (its kernel and its torch driver), not in
        generated sequence code: build() makes one for a selection with triton.wavefront."""
        self.emit(f"raise RuntimeError('over {self.ir.over}: {choice.kernel.name} runs in "
                  "backends/triton/grid_kernels.py')")

    def _operand_prologue(self, choice: Choice):
        """A chunkwise stage's operand math (l2norm(q) * K**-0.5, beta * -1.0 * -1.0, ...) as one
        generated kernel (prologue.py) whose outputs the stage's kernels read; an operand it
        cannot take stays torch ops, and the driver says why."""
        from .prologue import PrologueKernel, chunk_operands
        opaque = {n.id for core in self.cores for n in core}   # recurrent values: read, never recomputed
        operands = chunk_operands(choice.form)
        if isinstance(choice.form, ChunkDiag):   # a readout's constant scale is the chunk kernels' (SCALE)
            operands = [(role, (self._query_scale(n) or (n,))[0] if role == "q" else n) for role, n in operands]
        kern = PrologueKernel(self.ir, choice.stage, operands, set(self.seq), opaque, self.note,
                              self.ir.updates[choice.form.states[0]])
        self._row_kernel(kern, "operand prologue", "operands")

    def _row_kernel(self, kern, what: str, values: str):
        """Launch a PrologueKernel (a stage's operands, or the outputs' epilogue) and bind what
        it computes; what it leaves to torch ops is said in the driver, and an operand that is
        its leaf's elements (x[:, None][:, 0]) is read in place."""
        for remark in kern.remarks:
            self.emit(f"# {what}: {remark}")
        for node, leaf in kern.aliases:
            self.seq[node.id] = self.seq_name(leaf)
        if not kern.outputs:
            return
        idx = len(self.kernels)
        self.kernels.append(kern)
        leaves = ", ".join(self.seq_name(x) for x in kern.leaves)
        outs = self.fresh(values)
        self.emit(f"{outs} = launch.prologue(stage_kernels[{idx}], [{leaves}], {self.seq_dims()})"
                  f"  # triton kernel {kern.name}_fwd", kern.outputs[0])
        for i, o in enumerate(kern.outputs):
            self.seq[o.id] = f"{outs}[{i}]"

    def outputs_epilogue(self):
        """The outputs' math after the stages (mLSTM's h = (q @ C') / max(|q · n'|, e^{-m'}),
        a normaliser's division, a skip term) as one generated kernel forward and one
        backward, prologue.py's generator over the values the stages left: one launch where
        each op would be a torch operator (and autograd's several backward). Outputs a
        stage's kernel already wrote, and math it cannot take, stay as they are (said)."""
        from .prologue import PrologueKernel
        pending = [(name, n) for name, n in self.ir.outputs.items() if n.id not in self.seq and n.op != Op.CONST]
        if not pending:
            return
        opaque = {n.id for core in self.cores for n in core}
        kern = PrologueKernel(self.ir, len(self.plan.stages), pending, set(self.seq) | set(self.lazy), opaque,
                              self.note, pending[0][1], part="epilogue")
        self._row_kernel(kern, "outputs epilogue", "outputs")

    # ------------------------------------------------------------------ the kernel module
    def _chunk_diag_headers(self) -> list[str]:
        """The chunk kernels' block sizes and warps for each K x V of the cell's ChunkDiag
        stages (chunk_kernels.choose_blocks on a GPU, the sequence length unknown)."""
        from .chunk_kernels import header
        lines = []
        for c in self.selection.stages:
            if c.kernel.name == "triton.chunk_diag":
                K, V = self.ir.shape_of(self.ir.states[c.form.states[0]])[-2:]
                line = header(*((V, K) if c.form.transposed else (K, V)))   # the kernels run the transposed state
                if line not in lines:
                    lines.append(line)
        return lines

    def kernel_module(self) -> str:
        from .texpr import PREAMBLE
        head = [self.note.header(self.ir, "triton"), *self._chunk_diag_headers(),
                "import triton", "import triton.language as tl", "", ""]
        parts = ["\n".join(head) + PREAMBLE]
        combines = []
        for k in self.kernels:
            for c in k.combines():
                if c not in combines:
                    combines.append(c)
        parts += combines
        for k in self.kernels:
            parts.append(k.forward())
            parts.append(k.backward())
        return "\n\n".join(parts)


def _readout(n, u):
    """(q, axis) if n reads the [K, N] state u linearly, reducing one axis: u @ q or
    sum(u * q, -1) reduce N (axis 2: the last); q @ u or sum(u * q, 0) reduce K (axis 1).
    q is returned as the tile the kernel multiplies u by (q[:, None] for q @ u)."""
    from recdsl.types import ONE
    if n.op == Op.MATMUL and n.srcs[0] is u and n.srcs[1].rank == 1:
        return n.srcs[1], 2
    if n.op == Op.MATMUL and n.srcs[1] is u and n.srcs[0].rank == 1:
        q = n.srcs[0]
        return Node(Op.INDEX, (q,), (q.shape[0], ONE), (slice(None), None), span=q.span), 1
    if n.op == Op.SUM and n.arg[0] in (0, 1) and not n.arg[1] and n.srcs[0].op == Op.MUL:
        a, b = n.srcs[0].srcs
        q = b if a is u else a if b is u else None
        if q is not None and q.rank <= 2:
            return q, 2 if n.arg[0] == 1 else 1
    return None
