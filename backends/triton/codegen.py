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
from .scan_kernels import ScanKernel, ScanSpec, combine_source


class TritonEmitter(Emitter):
    def __init__(self, ir, plan):
        super().__init__(ir, plan)
        self.kernels: list = []            # ScanKernel / SeqKernel, in stage order
        self.how: dict[int, str] = {}      # stage index -> what runs it

    # ------------------------------------------------------------------ scans
    def _scan(self, low: StageLowering, spec: ScanSpec):
        sp = low.stage
        kern = ScanKernel(spec, self.note)
        idx = len(self.kernels)
        self.kernels.append(kern)
        leaves = ", ".join(self.seq_name(x) if texpr.literal(x) is None else texpr.literal(x)
                           for x in kern.leaves)
        shape = self.ir.shape_of(self.ir.states[sp.states[0]])
        seqs, fins = self.fresh("seqs"), self.fresh("finals")
        h0s = ", ".join(f"S0[{s!r}]" for s in sp.states)
        self.emit(f"{seqs}, {fins} = TK.scan(KS[{idx}], [{leaves}], [{h0s}], X0, NS, {shape!r})  "
                  f"# triton kernel {spec.name}_fwd", self.ir.updates[sp.states[0]])
        for i, s in enumerate(sp.states):
            self.seq[self.ir.updates[s].id] = f"{seqs}[{i}]"
            self.final[s] = f"{fins}[{i}]"
        self.how[sp.index] = f"triton {spec.kind} scan {spec.name}_fwd (gates fused in its prologue)"

    def _stage_element(self, low: StageLowering):
        sp = low.stage
        kind = low.nodes["kind"]
        a, b = low.nodes["a"], low.nodes["b"]
        if kind == "diagexp":  # the decay as exp(log a): the exponential is one more prologue op
            a = Node(Op.EXP, (a,), a.shape, span=a.span)
            kind = "diag"
        name = f"stage{sp.index}_{sp.states[0]}"
        self._scan(low, ScanSpec(name, kind, 1, [[a]], [b], list(sp.states)))

    def _stage_block(self, low: StageLowering):
        sp = low.stage
        states = sp.states
        A = [[low.nodes["A"].get((i, j)) for j in range(len(states))] for i in range(len(states))]
        b = [low.nodes["b"].get(s) for s in states]
        name = f"stage{sp.index}_{'_'.join(states)}"
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
        self.emit(f"{seqs}, {fins} = TK.seq(KS[{idx}], [{leaves}], [{h0s}], P0, X0, NS)  "
                  f"# triton kernel {kern.name}_fwd", self.ir.updates[sp.states[0]])
        for i, s in enumerate(sp.states):
            self.seq[self.ir.updates[s].id] = f"{seqs}[{i}]"
            self.final[s] = f"{fins}[{i}]"
        self.how[sp.index] = f"triton sequential kernel {kern.name}_fwd (time loop on chip)"

    # ------------------------------------------------------------------ the kernel module
    def kernel_module(self) -> str:
        from .texpr import PREAMBLE
        head = [self.note.header(self.ir, "triton").replace("backend", "backend kernels"),
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
