"""Plan -> the triton backend's two texts: the Triton kernel module (`recdsl inspect
--stage triton`) and the torch driver that launches it.

The driver is the torch backend's whole-sequence forward (hoisted matmuls stay one GEMM
over B*T, cuBLAS on a GPU) with each linear stage's kernel replaced by a generated Triton
scan whose prologue computes the stage's coefficients from the leaves, and each
sequential stage by a generated Triton loop (`seq_kernels`). Stages neither form covers
(matrix states: chunkwise forms, Triton backend II) keep the torch lowering, and say so."""
from __future__ import annotations

from ..torch.codegen import Emitter
from ..torch.lowering import StageLowering
from recdsl.ir import Node, Op

from . import texpr
from .fusion import pow2
from .scan_kernels import ScanKernel, ScanSpec


class TritonEmitter(Emitter):
    BACKEND = "triton"
    EXTRA_ARGS = ", REV=False, CU=None"    # reverse and cu_seqlens, passed to the kernels
    def __init__(self, ir, plan):
        super().__init__(ir, plan)
        self.kernels: list = []            # ScanKernel / SeqKernel, in stage order
        self.how: dict[int, str] = {}      # stage index -> what runs it
        self.store_marks: dict[int, list] = {}  # kernel -> its states (whose sequences may go unwritten)

    def program(self) -> str:
        """The driver; a kernel writes a state sequence only if the driver reads it (the
        Emitter's lazy values that were never bound) or a gradient needs it (at run time)."""
        text = super().program()
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
            name = self.fresh(f"{s}_seq")
            self.lazy[self.ir.updates[s].id] = (name, f"{name} = {seqs}[{i}]")
            self.final[s] = f"{fins}[{i}]"

    @property
    def native(self) -> bool:
        """reverse / cu_seqlens can go straight to the kernels: every stage is a Triton kernel
        (they index time themselves) and no value reads another stage's previous state
        (a shift along time, which would have to know the direction and the boundaries);
        the rest of the driver is per step. Otherwise the runtime flips and splits."""
        return all(h.startswith("triton") for h in self.how.values()) and \
            not any("rt.shift(" in line for line in self.lines)

    # ------------------------------------------------------------------ scans
    def _scan(self, low: StageLowering, spec: ScanSpec):
        sp = low.stage
        ir = self.ir
        spec.updates = [ir.updates[s] for s in sp.states]
        self._plan_epilogue(sp, spec)
        kern = ScanKernel(spec, self.note)
        idx = len(self.kernels)
        self.kernels.append(kern)
        leaves = ", ".join(x.view_text(self.seq_name(x.node)) for x in kern.leaves)
        rleaves = ", ".join(x.view_text(self.seq_name(x.node)) for x in kern.rleaves)
        shape = ir.shape_of(ir.states[sp.states[0]])
        seqs, fins, outs, reds = self.fresh("seqs"), self.fresh("finals"), self.fresh("outs"), self.fresh("reads")
        h0s = ", ".join(f"S0[{s!r}]" for s in sp.states)
        self.emit(f"{seqs}, {fins}, {outs}, {reds} = TK.scan(KS[{idx}], [{leaves}], [{rleaves}], [{h0s}], X0, NS, "
                  f"{shape!r}, store=@STORE{idx}@, rev=REV, cu=CU)  # triton kernel {spec.name}_fwd",
                  ir.updates[sp.states[0]])
        self._bind_sequences(idx, sp.states, seqs, fins)
        for i, o in enumerate(spec.outputs):
            self.seq[o.id] = f"{outs}[{i}]"
        for j, o in enumerate(spec.reduced):
            self.seq[o.id] = f"{reds}[{j}]"
        fused = len(spec.outputs) + len(spec.reduced)
        self.how[sp.index] = (f"triton {spec.kind} scan {spec.name}_fwd (gates fused in its prologue"
                              + (f"; {fused} output(s) in its epilogue" if fused else "")
                              + (f"; {len(spec.readouts)} fused readout(s) h' @ q" if spec.readouts else "") + ")")

    def _ready(self, n, stage: int) -> bool:
        """n can be read by a kernel of `stage`: it needs no state of this stage or later."""
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

    def _stage_element(self, low: StageLowering):
        sp = low.stage
        kind = low.nodes["kind"]
        a, b = low.nodes["a"], low.nodes["b"]
        if kind == "diagexp":  # the decay as exp(log a): the exponential is one more prologue op
            a = Node(Op.EXP, (a,), a.shape, span=a.span)
            kind = "diag"
        name = f"{self.ir.name.lower()}_stage{sp.index}_{sp.states[0]}"
        self._scan(low, ScanSpec(name, kind, 1, [[a]], [b], list(sp.states)))

    def _stage_block(self, low: StageLowering):
        sp = low.stage
        states = sp.states
        A = [[low.nodes["A"].get((i, j)) for j in range(len(states))] for i in range(len(states))]
        b = [low.nodes["b"].get(s) for s in states]
        name = f"{self.ir.name.lower()}_stage{sp.index}_{'_'.join(states)}"
        self._scan(low, ScanSpec(name, "block", len(states), A, b, list(states)))

    def _stage_chunk_diag(self, low):
        self.how[low.stage.index] = "torch: " + low.describe + " (matrix-state Triton kernels: backend II)"
        super()._stage_chunk_diag(low)

    def _stage_chunk_delta(self, low):
        self.how[low.stage.index] = "torch: " + low.describe + " (matrix-state Triton kernels: backend II)"
        super()._stage_chunk_delta(low)

    def _stage_loop(self, low):
        from .seq_kernels import NotEligible, SeqKernel
        try:
            kern = SeqKernel(self.ir, low.stage, self.place, self.note)
        except NotEligible as why:
            self.how[low.stage.index] = f"torch: sequential loop ({why})"
            return super()._stage_loop(low)
        idx = len(self.kernels)
        self.kernels.append(kern)
        leaves = ", ".join(self.seq_name(x) for x in kern.leaves)
        sp = low.stage
        seqs, fins = self.fresh("seqs"), self.fresh("finals")
        h0s = ", ".join(f"S0[{s!r}]" for s in sp.states)
        self.emit(f"{seqs}, {fins} = TK.seq(KS[{idx}], [{leaves}], [{h0s}], P0, X0, NS, rev=REV, cu=CU, "
                  f"store=@STORE{idx}@)  # triton kernel {kern.name}_fwd", self.ir.updates[sp.states[0]])
        self._bind_sequences(idx, sp.states, seqs, fins)
        self.how[sp.index] = f"triton sequential kernel {kern.name}_fwd (time loop on chip)"

    # ------------------------------------------------------------------ the kernel module
    def kernel_module(self) -> str:
        from .texpr import PREAMBLE
        head = [self.note.header(self.ir, "triton"),
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
