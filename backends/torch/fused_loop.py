"""Sequential stages without op dispatch: the whole time loop of an eligible stage runs in
ONE generated C call, and its backward in one more. Per step the forward computes the
recurrent GEMMs (W @ h for params W, with a small register-blocked kernel over weights
packed once per call) and then everything elementwise (the gates), reading the hoisted
inputs in place and writing the new states straight into the output sequences. This is
what makes an LSTM competitive with torch.nn.LSTM on CPU: a torch GEMM call per step (plus
a call for the gates) costs about as much again as oneDNN's whole LSTM.

Training: the forward also keeps every step's GEMM outputs; the backward (`grad_*`) walks
time in reverse, recomputes each lane's step from the saved previous states, runs the
lane's adjoint (c_adjoint.py: each op's derivative as torch defines it), and per step
multiplies the GEMM outputs' adjoints by W for the previous states. Input and parameter
gradients are written by the kernel (elementwise params summed per row); each weight's
gradient is one GEMM over all steps after the call. No per-step Python, no recompute under
autograd. Under create_graph=True the stage's torch twin is differentiated instead.

Eligible stages: every state is a vector of one length H; every core node other than the
GEMMs is elementwise (or a slice of the last axis) on vectors or scalars; GEMM inputs are
states of the stage. A vector of another length (the 4H pre-activations of an LSTM) is
only read through slices of length H; it is computed per lane at each slice's offset.

Also eligible means a C toolchain works in this process (checked when the kernel is
selected, so the plan says which loop runs). The library of each loop is built on first
use into the kernel cache (kcache.py); if that build fails the forward warns and runs
the per-step torch loop."""
from __future__ import annotations

import ctypes
from collections import namedtuple
import hashlib
import re
import subprocess
import warnings
from pathlib import Path

import torch

from recdsl.ir import BINARY, COMPARE, IRCell, Node, Op

from . import cpu_kernels, gemm, kcache
from .double_backward import recompute_vjp, wants_graph

C_UNARY = {
    Op.NEG: "(-{0})", Op.EXP: "EXP({0})", Op.LOG: "LOG({0})", Op.LOG1P: "LOG1P({0})", Op.EXPM1: "EXPM1({0})",
    Op.SIGMOID: "SIGM({0})", Op.TANH: "TANH({0})", Op.ABS: "FABS({0})",
    Op.SQRT: "SQRT({0})", Op.RSQRT: "(ONE / SQRT({0}))", Op.SIN: "SIN({0})", Op.COS: "COS({0})",
    Op.RELU: "({0} > 0 ? {0} : 0)", Op.SIGN: "(T_)(({0} > 0) - ({0} < 0))",
    Op.SILU: "({0} / (ONE + EXP(-({0}))))",
    Op.LOGSIGMOID: "({0} < 0 ? {0} - LOG1P(EXP({0})) : -LOG1P(EXP(-({0}))))",
    Op.SOFTPLUS: "({0} > 20 ? {0} : LOG1P(EXP({0})))",
    Op.ELU: "({0} > 0 ? {0} : EXPM1({0}))",
    Op.GELU: "((T_)0.5 * {0} * (ONE + ERF({0} * (T_)0.70710678118654752)))",
}
C_BINARY = {
    Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})", Op.DIV: "({0} / {1})",
    Op.POW: "POW({0}, {1})", Op.MAX: "({0} > {1} ? {0} : {1})", Op.MIN: "({0} < {1} ? {0} : {1})",
    Op.LOGADDEXP: "LAE({0}, {1})", Op.LT: "(T_)({0} < {1})", Op.LE: "(T_)({0} <= {1})",
    Op.GT: "(T_)({0} > {1})", Op.GE: "(T_)({0} >= {1})", Op.EQ: "(T_)({0} == {1})", Op.NE: "(T_)({0} != {1})",
}


class NotEligible(Exception):
    pass


def plan_stage(ir: IRCell, states: list[str], core: list[Node]):
    """(gemms, region, leaves) of a loop stage, or NotEligible with the reason."""
    H = ir.states[states[0]].shape
    if any(ir.states[s].shape != H or ir.states[s].rank != 1 for s in states):
        raise NotEligible("the states are not vectors of one length")
    core_ids = {n.id for n in core}
    gemms = [n for n in core if n.op == Op.MATMUL and _weight_param(n.srcs[0]) is not None and n.srcs[1].rank == 1]
    for g in gemms:
        x = g.srcs[1]
        if not (x.op == Op.STATE and x.arg[0] in states):
            raise NotEligible("a recurrent matmul reads a computed value, not a state")
    gemm_ids = {g.id for g in gemms}
    region = [n for n in core if n.id not in gemm_ids and n.op != Op.STATE]
    for n in region:
        if n.rank > 1:
            raise NotEligible(f"{n.op.name.lower()} on a matrix")
        if n.op in BINARY or n.op in COMPARE or n.op == Op.WHERE or n.op in C_UNARY or n.op == Op.CONST:
            continue
        if n.op == Op.INDEX and len(n.arg) == 1 and isinstance(n.arg[0], slice) and n.rank == 1:
            continue
        raise NotEligible(f"{n.op.name.lower()} is not elementwise")
    leaves = []
    seen = set()
    for n in region:
        for s in n.srcs:
            if s.id not in core_ids and s.id not in seen and not (s.op == Op.CONST and not s.shape):
                if s.rank > 1:
                    raise NotEligible("a matrix input")
                seen.add(s.id)
                leaves.append(s)
    return gemms, region, leaves


Fold = namedtuple("Fold", "sum seq weight x biases")   # a GEMM whose output the step only adds to a projection


def projection(n: Node):
    """(W, x, biases) when n = W @ x + b1 + ... for a matrix param W and vector params b
    of n's shape (a hoisted input projection), else None."""
    terms, stack = [], [n]
    while stack:
        m = stack.pop()
        if m.op == Op.ADD:
            stack.extend(m.srcs)
        else:
            terms.append(m)
    mms = [m for m in terms if m.op == Op.MATMUL and m.srcs[0].op == Op.PARAM and m.srcs[0].rank == 2
           and m.srcs[1].rank == 1]
    biases = [m for m in terms if m.op == Op.PARAM and m.rank == 1 and m.shape == n.shape]
    if len(mms) != 1 or len(biases) + 1 != len(terms):
        return None
    return mms[0].srcs[0], mms[0].srcs[1], biases


def plan_folds(ir: IRCell, gemms: list[Node], seqs: list[Node]) -> dict[int, Fold]:
    """{GEMM k: Fold} where the step reads the GEMM's output only as `projection + W @ h`
    (an LSTM's gates: W_ih @ x + b + W_hh @ h), and nothing else reads that projection.
    Then the loop computes the projection itself, a chunk of steps at a time, into the
    buffer the step GEMMs add to: no [B, T, 4H] tensor goes to memory and back between a
    torch GEMM and the loop (inference), the lanes read one value instead of two, and
    training saves one buffer for the backward instead of two."""
    users: dict[int, list[Node]] = {}
    for n in ir.nodes():
        for src in n.srcs:
            users.setdefault(src.id, []).append(n)
    seq_ids = {n.id for n in seqs}
    folds = {}
    for k, g in enumerate(gemms):
        readers = users.get(g.id, [])
        if len(readers) != 1 or readers[0].op != Op.ADD or readers[0].rank != 1:
            continue
        total = readers[0]
        other = total.srcs[1] if total.srcs[0] is g else total.srcs[0]
        if other is g or other.id not in seq_ids or len(users.get(other.id, [])) != 1 \
                or ir.shape_of(other) != ir.shape_of(g):
            continue
        parts = projection(other)
        if parts is not None:
            folds[k] = Fold(total, other, *parts)
    return folds


class _Gen:
    """C code for the stage's time loop; the region runs one lane (element i of the states) at a time."""

    def __init__(self, ir, states, gemms, leaves, folds: dict[int, Fold]):
        self.ir, self.states = ir, states
        self.H = ir.shape_of(ir.states[states[0]])[0]
        # a folded GEMM's value in the step is the sum (its buffer holds projection + W @ h)
        self.gemm = {(folds[k].sum if k in folds else g).id: k for k, g in enumerate(gemms)}
        self.folds = {k: ir.shape_of(f.x)[0] for k, f in folds.items()}    # GEMM k -> the projection's input length
        self.gemm_len = [ir.shape_of(g)[0] for g in gemms]
        self.gemm_src = [states.index(g.srcs[1].arg[0]) for g in gemms]   # the state each GEMM reads
        params = [n for n in leaves if n.op == Op.PARAM]
        seqs = [n for n in leaves if n.op != Op.PARAM]
        self.leaf = {n.id: k for k, n in enumerate(params)} | {n.id: k for k, n in enumerate(seqs)}
        self.kinds = {n.id: ("param" if n.op == Op.PARAM else "seq") for n in leaves}
        self.param_len = [self.length(n) for n in params]
        self.seq_len = [self.length(n) for n in seqs]
        self.leaf_rank = {(self.kinds[n.id], self.leaf[n.id]): n.rank for n in leaves}
        self.fold_seq = {self.leaf[f.seq.id]: k for k, f in folds.items()}   # seq leaf -> the GEMM it is folded into
        # the decode step computes the input projections its seq leaves read (step_projections)
        self.step_proj, self.seq_proj = step_projections(seqs, set(self.fold_seq))
        self.memo: dict = {}
        self.lines: list[str] = []
        self.order: list = []          # (key, node, name, source keys) per line: the lane graph, for the adjoint
        self.covered: set = set()      # ("gemm" | "seq", k): the backward writes all of its rows' adjoints
        self.count = 0
        from recdsl.torch_expr import SourceNotes
        self.notes = SourceNotes(ir)   # every generated line names the .rec line it came from

    def length(self, n: Node) -> int:
        return self.ir.shape_of(n)[0] if n.rank == 1 else 1

    @staticmethod
    def _key(n: Node, off: int) -> tuple[int, int]:
        return (n.id, 0 if n.rank == 0 else off)   # scalars ignore the lane

    def _srcs(self, n: Node, off: int) -> list[tuple[Node, int]]:
        """The (source, offset) values the line of element (i + off) of n reads."""
        off = self._key(n, off)[1]
        if (n.op == Op.CONST and not n.shape) or (n.op == Op.STATE and n.arg[0] in self.states) \
                or n.id in self.gemm or n.id in self.leaf:
            return []
        if n.op == Op.INDEX:
            return [(n.srcs[0], off + (n.arg[0].start or 0))]
        if n.op in C_UNARY or n.op in C_BINARY or n.op == Op.WHERE:
            return [(s, off) for s in n.srcs]
        raise NotEligible(n.op.name)  # pragma: no cover - plan_stage filters

    def val(self, n: Node, off: int) -> str:
        """C expression for element (i + off) of n (scalars ignore the lane): emits the lines
        of n and of the values it reads not emitted yet, sources first (depth first, in
        source order), with an explicit stack: an unrolled loop makes chains thousands of
        nodes deep."""
        stack = [(n, off, False)]
        while stack:
            x, o, ready = stack.pop()
            key = self._key(x, o)
            if key in self.memo:
                continue
            if not ready:
                stack.append((x, o, True))
                stack.extend((s, so, False) for s, so in reversed(self._srcs(x, o)))
                continue
            self.memo[key] = self._line(x, o)
        return self.memo[self._key(n, off)]

    def _line(self, n: Node, off: int) -> str:
        """Emit the line of element (i + off) of n, whose sources have names already."""
        off = self._key(n, off)[1]
        idx = f"(i + {off})" if n.rank == 1 else "0"
        name_of = lambda s, o: self.memo[self._key(s, o)]  # noqa: E731
        if n.op == Op.CONST and not n.shape:
            v = float(n.arg)
            expr = f"(T_){v!r}" if v == v and abs(v) != float("inf") else ("(T_)NAN" if v != v else
                                                                         ("(T_)INFINITY" if v > 0 else "(-(T_)INFINITY)"))
        elif n.op == Op.STATE and n.arg[0] in self.states:
            if off:
                raise NotEligible("a state read at an offset")
            expr = f"row_prev_{self.states.index(n.arg[0])}[i]"
        elif n.id in self.gemm:
            expr = f"row_gm_{self.gemm[n.id]}[{idx}]"
        elif n.id in self.leaf:
            k = self.leaf[n.id]
            if self.kinds[n.id] == "param":
                L = self.length(n)
                expr = f"((const T_*)pp_{k})[hd * {L if n.rank else 1} + {idx}]"
            else:
                expr = f"row_in_{k}[{idx}]"
        else:
            a = [name_of(s, o) for s, o in self._srcs(n, off)]
            if n.op == Op.INDEX:
                expr = a[0]
            elif n.op in C_UNARY:
                expr = C_UNARY[n.op].format(*a)
            elif n.op in C_BINARY:
                expr = C_BINARY[n.op].format(*a)
            else:  # WHERE
                expr = f"({a[0]} ? {a[1]} : {a[2]})"
        name = f"v{self.count}"
        self.count += 1
        self.order.append((self._key(n, off), n, name, [self._key(s, o) for s, o in self._srcs(n, off)]))
        where = self.notes(n, with_text=False)
        self.lines.append(f"        T_ {name} = {expr};" + (f"  /* {where} */" if where else ""))
        return name

    # ------------------------------------------------------------------ the C file
    def source(self, updates: list[Node], nparams: int, nseq: int) -> str:
        """The C file: the forward loop `loop_*` and its reverse-time adjoint `grad_*`, in
        float and double."""
        self.updates = updates
        self.nparams, self.nseq = nparams, nseq
        outs = [self.val(u, 0) for u in updates]
        body = "\n".join(self.lines)   # one lane of the step
        fn = self._forward_fn(outs, body) + self._backward_fn()
        self.step_source = _c_file(DOTS, self._step_fn(outs, body))
        return _c_file(GEMM, fn)

    def _gemm_calls(self, fwd: bool) -> str:
        """Per step, W @ state (forward) or adjoint @ W (backward) for every GEMM, the threads
        splitting the output panels: W [L, H] shared by the heads (rows: B * NH) or
        [NH, L, H] (rows: the B states of each head), one packed panel of NR outputs each."""
        out = []
        for k, (L, j) in enumerate(zip(self.gemm_len, self.gemm_src)):
            if not fwd:
                out.append(self._adjoint_gemm_call(k, L))
                continue
            if k in self.folds:
                out.append(self._projection_call(k, L))
            # gm[t] = state @ W^T for the B rows of each head (a W shared by the heads: every head)
            what = "+= state @ W^T (onto the step's projection)" if k in self.folds else "= state @ W^T"
            out.append(f"""      {{  /* gm[t] {what} */
        const int64_t L = {L}, np = (L + NR_SFX - 1) / NR_SFX;
        #pragma omp for schedule(static) nowait
        for (int64_t it = 0; it < wh_{k} * np; it++) {{
          int64_t p = it % np, nc = L - p * NR_SFX < NR_SFX ? L - p * NR_SFX : NR_SFX;
          for (int64_t hd = wh_{k} == 1 ? 0 : it / np; hd < (wh_{k} == 1 ? NH : it / np + 1); hd++)
            panel_SFX(cur_{j} + hd * H, NH * H, B, H, wp_{k} + it * H * NR_SFX,
                      gm_{k} + (t % gtc_{k}) * gst_{k} + hd * L + p * NR_SFX, gsb_{k}, nc, NULL, {int(k in self.folds)});
        }}
      }}""")
        return "\n".join(out)

    def _projection_call(self, k: int, L: int) -> str:
        """A folded GEMM's input projection W_x @ x + b for the next gch steps, at the first
        of them, into gm's ring (the B rows of each head; the threads split the panels).
        The barrier after it: the step GEMMs of another split add to these rows."""
        return f"""      if (t % gch_{k} == 0) {{  /* gm[t .. t + gch) = W_x @ x + b: the input projection of a chunk of steps */
        const int64_t L = {L}, D = {self.folds[k]}, np = (L + NR_SFX - 1) / NR_SFX, steps = T - t < gch_{k} ? T - t : gch_{k};
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < pwh_{k} * np; it++) {{
          int64_t p = it % np, nc = L - p * NR_SFX < NR_SFX ? L - p * NR_SFX : NR_SFX;
          const T_* x = (const T_*)px_{k}.p;
          T_* out = gm_{k} + (t % gtc_{k}) * gst_{k} + p * NR_SFX;
          const T_* panel = pwp_{k} + it * D * NR_SFX;
          for (int64_t hd = pwh_{k} == 1 ? 0 : it / np; hd < (pwh_{k} == 1 ? NH : it / np + 1); hd++) {{
            const T_* bias = pb_{k} + hd * pbs_{k} + p * NR_SFX;
            if (B >= steps)   /* the GEMM's rows: the B rows of each step, or the steps of each row */
              for (int64_t s = 0; s < steps; s++)
                panel_SFX(x + hd * px_{k}.sh + (t + s) * px_{k}.st, px_{k}.sb, B, D, panel,
                          out + s * gst_{k} + hd * L, gsb_{k}, nc, bias, 0);
            else
              for (int64_t b = 0; b < B; b++)
                panel_SFX(x + b * px_{k}.sb + hd * px_{k}.sh + t * px_{k}.st, px_{k}.st, steps, D, panel,
                          out + b * gsb_{k} + hd * L, gst_{k}, nc, bias, 0);
          }}
        }}
      }}"""

    def _pack_calls(self, fwd: bool) -> str:
        """Before the time loop, each thread packs the weight panels that its share of every
        step's GEMMs multiplies (the same static split of the same panel count), so a panel
        is written into the cache of the core that reads it, in parallel, and no packed copy
        is made by torch per call. Forward panels run along W's rows (outputs), the
        backward's along its columns (dgm @ W)."""
        out = []
        for k, L in enumerate(self.gemm_len):
            count, pack = (("(L + NR_SFX - 1) / NR_SFX", f"pack_rows_SFX(w_{k} + (it / np) * L * H, L, H, it % np, "
                            f"wp_{k} + it * H * NR_SFX)") if fwd else
                           ("(H + NR_SFX - 1) / NR_SFX", f"pack_cols_SFX(w_{k} + (it / np) * L * H, L, H, it % np, "
                            f"wb_{k} + it * L * NR_SFX)"))
            out.append(f"""    {{
      const int64_t L = {L}, np = {count};
      #pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < wh_{k} * np; it++)
        {pack};
    }}""")
            if fwd and k in self.folds:
                out.append(f"""    {{
      const int64_t L = {L}, D = {self.folds[k]}, np = (L + NR_SFX - 1) / NR_SFX;
      #pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < pwh_{k} * np; it++)
        pack_rows_SFX(pw_{k} + (it / np) * L * D, L, D, it % np, pwp_{k} + it * D * NR_SFX);
    }}""")
        return "\n".join(out)

    @staticmethod
    def _adjoint_gemm_call(k: int, L: int) -> str:
        """gl [B*NH, H] = dgm[t] @ W, the threads splitting the output panels. dgm is laid out
        [B, T, NH, L] like the inputs' gradients (one tensor serves both where they are the
        same adjoint), so the B rows of a step and head are T*NH*L apart; W is [NH, L, H] per
        head, or shared [L, H] with NH = 1 (FusedLoop.backward checks)."""
        return f"""      {{
        const int64_t L = {L}, np = (H + NR_SFX - 1) / NR_SFX;
        #pragma omp for schedule(static) nowait
        for (int64_t it = 0; it < wh_{k} * np; it++) {{
          int64_t hd = it / np, p = it % np, nc = H - p * NR_SFX < NR_SFX ? H - p * NR_SFX : NR_SFX;
          panel_SFX(dgm_{k} + (t * NH + hd) * L, T * NH * L, B, L, wb_{k} + it * L * NR_SFX,
                    gl_{k} + hd * H + p * NR_SFX, NH * H, nc, NULL, 0);
        }}
      }}"""

    def _forward_fn(self, outs: list[str], body: str) -> str:
        ns, ng = len(outs), len(self.gemm_len)
        sig = ", ".join([f"T_* st{k}_0, T_* st{k}_1, T_* out_{k}, int64_t osb_{k}, int64_t ost_{k}" for k in range(ns)]
                        + [f"T_* gm_{k}, int64_t gsb_{k}, int64_t gst_{k}, int64_t gtc_{k}, const T_* w_{k}, "
                           f"T_* wp_{k}, int64_t wh_{k}" + (f", view_t px_{k}, const T_* pw_{k}, T_* pwp_{k}, "
                                                          f"int64_t pwh_{k}, const T_* pb_{k}, int64_t pbs_{k}, "
                                                          f"int64_t gch_{k}" if k in self.folds else "")
                           for k in range(ng)]
                        + [f"const void* pp_{k}" for k in range(self.nparams)]
                        + [f"view_t in_{k}" for k in range(self.nseq)]
                        + ["int64_t T", "int64_t B", "int64_t NH", "int64_t nthreads"])
        stores = "\n".join(f"          row_out_{k}[i] = {v}; row_next_{k}[i] = {v};" for k, v in enumerate(outs))
        rows = _used(body + stores,
                     [f"const T_* restrict row_prev_{k} = cur_{k} + bh * H;" for k in range(ns)]
                     + [f"T_* restrict row_out_{k} = out_{k} + b * osb_{k} + t * ost_{k} + hd * H;" for k in range(ns)]
                     + [f"T_* restrict row_next_{k} = nxt_{k} + bh * H;" for k in range(ns)]
                     + [f"const T_* restrict row_gm_{k} = gm_{k} + b * gsb_{k} + (t % gtc_{k}) * gst_{k} + hd * {L};"
                        for k, L in enumerate(self.gemm_len)]
                     + [f"const T_* restrict row_in_{k} = (const T_*)in_{k}.p + b * in_{k}.sb + hd * in_{k}.sh"
                        f" + t * in_{k}.st;" for k in range(self.nseq)])
        init = " ".join(f"T_* cur_{k} = st{k}_0; T_* nxt_{k} = st{k}_1;" for k in range(ns))
        swap = " ".join(f"{{ T_* tmp = cur_{k}; cur_{k} = nxt_{k}; nxt_{k} = tmp; }}" for k in range(ns))
        # The whole time loop in one call, in one parallel region: per step the threads split
        # the GEMMs' output panels, meet at a barrier, split the (batch, head) rows of the
        # elementwise step, meet again (the next GEMMs read every lane of the new states).
        # Training saves every step's GEMM outputs (gst = B * NH * L) for the backward.
        return f"""
void loop_SFX({sig}) {{
  const int64_t H = {self.H};
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {{
    {init}
{self._pack_calls(fwd=True)}
    for (int64_t t = 0; t < T; t++) {{
{self._prefetch(rows, {f"row_in_{k}": n for k, n in enumerate(self.seq_len)}, "t + 1", "t + 1 < T")}{self._gemm_calls(fwd=True)}
      #pragma omp barrier
      #pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * NH; bh++) {{
        int64_t b = bh / NH, hd = bh % NH;
{rows}
        #pragma omp simd
        for (int64_t i = 0; i < H; i++) {{
{body}
{stores}
        }}
      }}
      {swap}
    }}
  }}
}}
"""

    def _step_fn(self, outs: list[str], body: str) -> str:
        """step_*: one step for decoding (layer.step). The weights are read as stored, each
        once, so they are not packed: every GEMM output is a dot product of a state row with
        a weight row (dots_*); a folded GEMM starts from its bias plus the projection of this
        step's x. Threads only where the step's multiply-adds pay for two barriers."""
        ns, ng = len(outs), len(self.gemm_len)
        sig = ", ".join([f"const T_* prev_{k}, T_* next_{k}" for k in range(ns)]
                        + [f"T_* gm_{k}, const T_* w_{k}, int64_t wh_{k}" + (
                            f", const T_* px_{k}, const T_* pw_{k}, int64_t pwh_{k}, const T_* pb_{k}, int64_t pbs_{k}"
                            if k in self.folds else "") for k in range(ng)]
                        + [f"const void* pp_{k}" for k in range(self.nparams)]
                        + [f"view_t in_{k}" for k in range(self.nseq)]
                        + [f"const T_* sx_{m}, const T_* sw_{m}, int64_t swh_{m}, const T_* sb_{m}, int64_t sbs_{m}, "
                           f"T_* sp_{m}" for m in range(len(self.step_proj))]
                        + ["int64_t B", "int64_t NH", "int64_t nthreads"])
        split = "\n".join([self._step_projection(m) for m in range(len(self.step_proj))]
                          + [self._step_gemm(k, L, j) for k, (L, j) in enumerate(zip(self.gemm_len, self.gemm_src))])
        stores = "\n".join(f"          row_next_{k}[i] = {v};" for k, v in enumerate(outs))
        rows = _used(body + stores,
                     [f"const T_* restrict row_prev_{k} = prev_{k} + bh * H;" for k in range(ns)]
                     + [f"T_* restrict row_next_{k} = next_{k} + bh * H;" for k in range(ns)]
                     + [f"const T_* restrict row_gm_{k} = gm_{k} + bh * {L};" for k, L in enumerate(self.gemm_len)]
                     + [f"const T_* restrict row_in_{k} = sp_{self.seq_proj[k][0]} + bh * "
                        f"{self.ir.shape_of(self.step_proj[self.seq_proj[k][0]][0])[0]} + {self.seq_proj[k][1]};"
                        if k in self.seq_proj else
                        f"const T_* restrict row_in_{k} = (const T_*)in_{k}.p + b * in_{k}.sb + hd * in_{k}.sh;"
                        for k in range(self.nseq)])
        return f"""
void step_SFX({sig}) {{
  const int64_t H = {self.H};
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {{
{split}
    #pragma omp barrier
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * NH; bh++) {{
{_row_index(rows + body)}
{rows}
      #pragma omp simd
      for (int64_t i = 0; i < H; i++) {{
{body}
{stores}
      }}
    }}
  }}
}}
"""

    def _step_projection(self, m: int) -> str:
        """Input projection m of one step, sp = b + x W^T (the gate inputs a GRU reads as
        slices), the threads splitting its outputs as the GEMMs'."""
        node, _, x, _ = self.step_proj[m]
        L, D = self.ir.shape_of(node)[0], self.ir.shape_of(x)[0]
        return f"""    {{  /* the step's input projection {m}: b + x W^T */
      const int64_t L = {L}, D = {D}, blocks = (L + 15) / 16;
      #pragma omp for schedule(static) nowait
      for (int64_t job = 0; job < NH * blocks; job++) {{
        int64_t hd = job / blocks, c0 = (job % blocks) * 16, c1 = c0 + 16 < L ? c0 + 16 : L;
        dots_SFX(sx_{m} + hd * D, NH * D, B, sw_{m} + (swh_{m} == 1 ? 0 : hd) * L * D + c0 * D, D, c1 - c0, D,
                 sp_{m} + hd * L + c0, NH * L, sb_{m} + hd * sbs_{m} + c0, 0);
      }}
    }}"""

    def _step_gemm(self, k: int, L: int, j: int) -> str:
        """GEMM k of one step: gm [B * NH, L] = state j @ W^T (+ a folded projection's
        b + x W_x^T first), the threads splitting the outputs into blocks of 16 per head."""
        project = ""
        if k in self.folds:
            D = self.folds[k]
            project = f"""
        dots_SFX(px_{k} + hd * {D}, NH * {D}, B, pw_{k} + (pwh_{k} == 1 ? 0 : hd) * L * {D} + c0 * {D}, {D},
                 c1 - c0, {D}, gm_{k} + hd * L + c0, NH * L, pb_{k} + hd * pbs_{k} + c0, 0);   /* b + x W_x^T */"""
        return f"""    {{
      const int64_t L = {L}, blocks = (L + 15) / 16;
      #pragma omp for schedule(static) nowait
      for (int64_t job = 0; job < NH * blocks; job++) {{
        int64_t hd = job / blocks, c0 = (job % blocks) * 16, c1 = c0 + 16 < L ? c0 + 16 : L;{project}
        dots_SFX(prev_{j} + hd * H, NH * H, B, w_{k} + (wh_{k} == 1 ? 0 : hd) * L * H + c0 * H, H,
                 c1 - c0, H, gm_{k} + hd * L + c0, NH * L, NULL, {int(k in self.folds)});
      }}
    }}"""

    def _prefetch(self, rows: str, lengths: dict[str, int], step: str, valid: str) -> str:
        """Software prefetch of another step's rows that this thread's share of the lane loop
        reads (the loop's static split of the B * NH rows, as libgomp makes it), issued
        before the GEMMs of this step so that the memory traffic overlaps their arithmetic:
        the hardware prefetchers follow a row but not the jump to the next step's rows, and
        streaming an LSTM's [B, T, 4H] projections from memory cost a tenth of its loop.
        `lengths`: the row pointers to fetch (a declaration of `rows`) and their lengths."""
        if not self.gemm_len:
            return ""        # no GEMM to overlap with
        fetch = []
        for decl in rows.splitlines():
            m = re.match(r"\s*(?:const )?T_\* restrict (\w+) = (.*);$", decl)
            if m and m.group(1) in lengths:
                expr = re.sub(r"\bt\b", "tn", m.group(2))
                fetch.append(f"          {{ const char* row = (const char*)({expr});\n"
                             f"            for (int64_t o = 0; o < {lengths[m.group(1)]} * (int64_t)sizeof(T_); o += 64) "
                             f"__builtin_prefetch(row + o, 0, 2); }}")   # to L2: the GEMM holds L1
        if not fetch:
            return ""
        body = "\n".join(fetch)
        return f"""      if ({valid}) {{   /* step {step}'s rows of this thread's lanes, fetched while the GEMMs compute */
        int64_t rows = B * NH, nth = omp_get_num_threads(), me = omp_get_thread_num(), q = rows / nth, r = rows % nth;
        int64_t lo = me < r ? me * (q + 1) : me * q + r, hi = lo + q + (me < r);
        for (int64_t bh = lo; bh < hi; bh++) {{
          int64_t b = bh / NH, hd = bh % NH, tn = {step};
{body}
        }}
      }}
"""

    def _backward_fn(self) -> str:
        """grad_*: time in reverse. Per step, each (batch, head) row recomputes its lanes from
        the saved previous states and GEMM outputs, seeds the new states' adjoints (from the
        next step, the GEMMs' share and the output sequences' gradients), runs the lane's
        adjoint and stores: the previous states' direct adjoints (dd), the GEMM outputs'
        adjoints (dgm, kept for every step: dW is one GEMM after the call), the inputs'
        gradients, and the elementwise params' gradients summed per row. Then the threads
        split dgm[t] @ W for the previous states (gl, read by the step before)."""
        ns, ng = len(self.updates), len(self.gemm_len)
        adj, stores, reductions, simd = self._adjoint()
        sig = ", ".join([f"const T_* sq_{k}, int64_t osb_{k}, int64_t ost_{k}, const T_* s0_{k}, view_t gs_{k}, "
                         f"T_* dd_{k}" for k in range(ns)]
                        + [f"const T_* gm_{k}, T_* dgm_{k}, const T_* w_{k}, T_* wb_{k}, int64_t wh_{k}, T_* gl_{k}"
                           for k in range(ng)]
                        + [f"const void* pp_{k}, T_* dpp_{k}" for k in range(self.nparams)]
                        + [f"view_t in_{k}, T_* din_{k}" for k in range(self.nseq)]
                        + ["int64_t T", "int64_t B", "int64_t NH", "int64_t nthreads"])
        lam = "\n".join(f"        T_ lam_{k} = " + " + ".join(
            [f"row_dd_{k}[i]", f"row_gs_{k}[i]"] + [f"row_gl_{g}[i]" for g, j in enumerate(self.gemm_src) if j == k])
            + ";" for k in range(ns))
        lanes = "\n".join([self._recomputed(adj + stores), lam, adj, stores])
        red_decl = " ".join(f"T_ {r} = 0;" for r, _ in reductions)
        red_store = "\n".join(f"        {store}" for _, store in reductions)
        pragma = ("#pragma omp simd" + (f" reduction(+:{', '.join(r for r, _ in reductions)})" if reductions else "")
                  if simd else "/* lanes write overlapping elements: no simd */")
        rows = _used(lanes + red_store,
                     [f"const T_* restrict row_prev_{k} = t > 0 ? sq_{k} + b * osb_{k} + (t - 1) * ost_{k} + hd * H"
                      f" : s0_{k} + bh * H;" for k in range(ns)]
                     + [f"const T_* restrict row_gs_{k} = (const T_*)gs_{k}.p + b * gs_{k}.sb + hd * gs_{k}.sh"
                        f" + t * gs_{k}.st;" for k in range(ns)]
                     + [f"T_* restrict row_dd_{k} = dd_{k} + bh * H;" for k in range(ns)]
                     + [f"const T_* restrict row_gm_{k} = gm_{k} + ((b * T + t) * NH + hd) * {L};"
                        for k, L in enumerate(self.gemm_len)]
                     + [f"T_* restrict row_dgm_{k} = dgm_{k} + ((b * T + t) * NH + hd) * {L};"
                        for k, L in enumerate(self.gemm_len)]
                     + [f"const T_* restrict row_gl_{k} = gl_{k} + bh * H;" for k in range(ng)]
                     + [f"T_* restrict row_dpp_{k} = dpp_{k} + bh * {self.param_len[k]};" for k in range(self.nparams)]
                     + [f"const T_* restrict row_in_{k} = (const T_*)in_{k}.p + b * in_{k}.sb + hd * in_{k}.sh"
                        f" + t * in_{k}.st;" for k in range(self.nseq)]
                     + [f"T_* restrict row_din_{k} = din_{k} + ((b * T + t) * NH + hd) * {self.seq_len[k]};"
                        for k in range(self.nseq)])
        fetched = ({f"row_in_{k}": n for k, n in enumerate(self.seq_len)}
                   | {f"row_gm_{k}": n for k, n in enumerate(self.gemm_len)}
                   | {f"row_gs_{k}": self.H for k in range(ns)} | {f"row_prev_{k}": self.H for k in range(ns)})
        return f"""
void grad_SFX({sig}) {{
  const int64_t H = {self.H};
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {{
{self._pack_calls(fwd=False)}
    for (int64_t t = T - 1; t >= 0; t--) {{
      #pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * NH; bh++) {{
        int64_t b = bh / NH, hd = bh % NH;
{rows}
        {red_decl}
        {pragma}
        for (int64_t i = 0; i < H; i++) {{
{lanes}
        }}
{red_store}
      }}
{self._prefetch(rows, fetched, "t - 1", "t > 0")}\
{self._gemm_calls(fwd=False)}
      #pragma omp barrier
    }}
  }}
}}
"""

    def _recomputed(self, reader: str) -> str:
        """The forward lines the backward reads (transitively): not the new states' values,
        which only the forward stores."""
        import re
        needed = set(re.findall(r"\bv\d+\b", reader))
        for key, n, name, srcs in reversed(self.order):
            if name in needed:
                needed.update(self.memo[s] for s in srcs)
        return "\n".join(line for line, (_, _, name, _) in zip(self.lines, self.order) if name in needed)

    def _adjoint(self):
        """The lane's reverse pass: (adjoint lines, store lines, [(reduction, its store)],
        simd ok). Walks the lane graph from the new states back, each value's adjoint the sum
        of its readers' terms (c_adjoint.py), and stores the adjoints of the leaves: states
        (dd), GEMM outputs (dgm), inputs (din) and params (dpp, accumulated over time).
        A scalar leaf's adjoint is a sum over the lanes (an OpenMP reduction)."""
        from collections import defaultdict

        from .c_adjoint import source_terms
        pending: dict = defaultdict(list)
        for k, u in enumerate(self.updates):
            pending[self._key(u, 0)].append(f"lam_{k}")
        lines, leaf_adj = [], defaultdict(list)      # leaf slot -> [(offset, adjoint)]
        root: dict = {}                              # adjoint -> the one it copies (a7 = a6)
        for key, n, name, srcs in reversed(self.order):
            terms = pending.pop(key, None)
            if not terms or (n.op == Op.CONST and not n.shape):
                continue
            g = f"a{len(lines)}"
            root[g] = root[terms[0]] if len(terms) == 1 and terms[0] in root else g
            where = self.notes(n, with_text=False)
            lines.append((g, f"        T_ {g} = {' + '.join(terms)};" + (f"  /* d {where} */" if where else "")))
            slot = self._leaf_slot(n)
            if slot is not None:
                leaf_adj[slot].append((key[1], g))
                continue
            for s, term in zip(srcs, source_terms(n.op, [self.memo[s] for s in srcs], name, g)):
                if term is not None:
                    pending[s].append(term)
        self.aliases = {**self._same_adjoints(leaf_adj, root), **self.fold_seq}
        unread = {g for k in self.aliases for _, g in leaf_adj[("seq", k)]}   # the aliased input's copies
        lines = [line for g, line in lines if g not in unread]
        stores, reductions, simd = [], [], True
        for k in range(len(self.updates)):
            got = [g for _, g in leaf_adj.pop(("state", k), [])]
            stores.append(f"          row_dd_{k}[i] = {' + '.join(got) if got else '(T_)0'};")
        for (kind, k), pairs in leaf_adj.items():
            if kind == "seq" and k in self.aliases:
                continue          # the GEMM output's adjoint, stored once (FusedLoop.backward)
            row = {"gemm": f"row_dgm_{k}", "seq": f"row_din_{k}", "param": f"row_dpp_{k}"}[kind]
            if self._scalar_slot(kind, k):
                if kind == "seq":
                    self.covered.add((kind, k))
                red = f"red_{kind}_{k}"
                reductions.append((red, f"{row}[0] {'+=' if kind == 'param' else '='} {red};"))
                stores.append(f"          {red} += {' + '.join(g for _, g in pairs)};")
                continue
            offs = sorted(o for o, _ in pairs)
            overlap = any(b - a < self.H for a, b in zip(offs, offs[1:]))
            simd = simd and not overlap
            op = "+=" if overlap or kind == "param" else "="     # params sum over time
            length = self.gemm_len[k] if kind == "gemm" else self.seq_len[k] if kind == "seq" else None
            if offs == list(range(0, self.H * len(offs), self.H)) and length == self.H * len(offs):
                self.covered.add((kind, k))    # every element written once a step: no zero-fill needed
            stores += [f"          {row}[i + {o}] {op} {g};" for o, g in pairs]
        return "\n".join(lines), "\n".join(stores), reductions, simd

    def _same_adjoints(self, leaf_adj: dict, root: dict) -> dict:
        """{input k: GEMM j} where the input's gradient IS the GEMM output's adjoint, element
        by element: the LSTM's gates W_ih @ x + W_hh @ h read both only through their sum.
        Then the kernel stores one of them and the hoisted projection's backward reads it
        (no second [B, T, L] write, no second transpose for its weight gradient)."""
        def whole(pairs, length):   # every element written once a step, at offsets 0, H, 2H, ...
            offs = sorted(o for o, _ in pairs)
            return offs == list(range(0, self.H * len(offs), self.H)) and length == self.H * len(offs)

        aliases = {}
        for (kind, k), pairs in leaf_adj.items():
            if kind != "seq" or self._scalar_slot(kind, k) or not whole(pairs, self.seq_len[k]):
                continue
            mine = {o: root[g] for o, g in pairs}
            for j, L in enumerate(self.gemm_len):
                theirs = leaf_adj.get(("gemm", j), [])
                if j not in aliases.values() and L == self.seq_len[k] and whole(theirs, L) \
                        and {o: root[g] for o, g in theirs} == mine:
                    aliases[k] = j
                    break
        return aliases

    def _leaf_slot(self, n: Node):
        """(kind, index) of the buffer a leaf's adjoint goes to, or None for a computed value."""
        if n.op == Op.STATE and n.arg[0] in self.states:
            return ("state", self.states.index(n.arg[0]))
        if n.id in self.gemm:
            return ("gemm", self.gemm[n.id])
        if n.id in self.leaf:
            return (self.kinds[n.id], self.leaf[n.id])
        return None

    def _scalar_slot(self, kind: str, k: int) -> bool:
        return kind != "gemm" and (self.param_len if kind == "param" else self.seq_len)[k] == 1 and \
            self.leaf_rank[(kind, k)] == 0


def _c_file(helpers: str, fn: str) -> str:
    """A C file of generated functions `fn` (written with SFX and T_) and their `helpers`,
    in float and double."""
    halves = []
    for sfx, T_, macros, lae in (("f32", "float", _MACROS32, "LAE_f"), ("f64", "double", _MACROS64, "LAE_d")):
        halves.append(macros + f"#define LAE {lae}\n" + (helpers + fn).replace("SFX", sfx).replace("T_", T_)
                      + "".join(f"#undef {m}\n" for m in _MACRO_NAMES) + "#undef LAE\n")
    # vmath.h: vexpf / vtanhf, which vectorise across lanes (libm's are scalar calls, and
    # the gates of a 4096-lane step would cost more than the step's GEMM)
    return ('#include "vmath.h"\n#include <omp.h>\n'
            "typedef struct { const void* p; int64_t sb, sh, st, sf; } view_t;\n"
            "/* one SIMD register: the GEMM panels are NR outputs wide */\n"
            "#if defined(__AVX512F__)\n#define VBYTES 64\n#define VPP 2\n#else\n#define VBYTES 32\n#define VPP 1\n#endif\n"
            + _LAE + "".join(halves))


def _row_index(text: str) -> str:
    """The declaration of a row's batch index b and head hd, as far as `text` reads them."""
    parts = [d for d, name in (("b = bh / NH", "b"), ("hd = bh % NH", "hd")) if re.search(rf"\b{name}\b", text)]
    return f"      int64_t {', '.join(parts)};" if parts else ""


def _used(text: str, decls: list[str]) -> str:
    """The row-pointer declarations whose name the loop body reads (no unused pointers)."""
    keep = [d for d in decls if d.split(" = ")[0].split()[-1] in text]
    return "\n".join(f"        {d}" for d in keep)


_MACRO_NAMES = ("EXP", "LOG", "LOG1P", "EXPM1", "TANH", "FABS", "SQRT", "SIN", "COS", "POW", "ERF", "ONE", "SIGM")
_MACROS32 = ("#define EXP vexpf\n#define LOG logf\n#define LOG1P log1pf\n#define EXPM1 expm1f\n#define TANH vtanhf\n"
             "#define FABS fabsf\n#define SQRT sqrtf\n#define SIN sinf\n#define COS cosf\n#define POW powf\n"
             "#define ERF erff\n#define ONE 1.0f\n#define SIGM vsigmoidf\n")
_MACROS64 = ("#define EXP exp\n#define LOG log\n#define LOG1P log1p\n#define EXPM1 expm1\n#define TANH tanh\n"
             "#define FABS fabs\n#define SQRT sqrt\n#define SIN sin\n#define COS cos\n#define POW pow\n"
             "#define ERF erf\n#define ONE 1.0\n#define SIGM(x) (ONE / (ONE + EXP(-(x))))\n")
_LAE = ("static inline float LAE_f(float a, float b) { float m = a > b ? a : b; "
        "return isinf(m) && m < 0 ? m : m + log1pf(expf(-(a > b ? a - b : b - a))); }\n"
        "static inline double LAE_d(double a, double b) { double m = a > b ? a : b; "
        "return isinf(m) && m < 0 ? m : m + log1p(exp(-(a > b ? a - b : b - a))); }\n")


# The recurrent GEMM: c[r, 0:nc] = a[r, :] @ wp for one panel wp [K][NR] of the weight packed
# K-major (NR: one 32-byte vector of outputs), 8 rows at a time with the accumulators in
# registers (one weight load feeds 8 FMAs). Per step the weights (1 MiB for an LSTM with
# H=256) stream from L2 while the states stay in L1; this runs the [16, 256] x [256, 1024]
# step GEMM twice as fast as a torch (MKL) call per step. Measured on AVX2 (2 cores): 8x1
# vectors beat 4x2, 2x4 and 3x3 blocks by 10-20%.
GEMM = """
#define VL_SFX ((int64_t)(VBYTES / sizeof(T_)))
#define NR_SFX (VPP * VL_SFX)
typedef T_ vec_SFX __attribute__((vector_size(VBYTES)));
typedef T_ uvec_SFX __attribute__((vector_size(VBYTES), aligned(sizeof(T_))));  /* unaligned rows of c */

int64_t nr_SFX(void) { return NR_SFX; }   /* the panel width the packing in Python must match */

/* nc (< NR at the last panel) outputs of a panel's VPP vectors */
static inline void store_SFX(T_* c, const vec_SFX* v, int64_t nc) {
  for (int j = 0; j < VPP; j++, c += VL_SFX, nc -= VL_SFX) {
    if (nc >= VL_SFX) *(uvec_SFX*)c = v[j];
    else if (nc > 0) memcpy(c, &v[j], nc * sizeof(T_));
  }
}

/* nc (< NR at the last panel) values into a panel's VPP vectors, zero past nc */
static inline void load_SFX(const T_* c, vec_SFX* v, int64_t nc) {
  for (int j = 0; j < VPP; j++, c += VL_SFX, nc -= VL_SFX) {
    v[j] = (vec_SFX){0};
    if (nc >= VL_SFX) v[j] = *(const uvec_SFX*)c;
    else if (nc > 0) memcpy(&v[j], c, nc * sizeof(T_));
  }
}

/* What the accumulators start from: zero, the bias of the panel's outputs (bias != NULL),
   or what c holds (accumulate: the step's input projection, which the product adds to) */
static inline void start_SFX(vec_SFX* acc, const T_* c, int64_t nc, const T_* bias, int accumulate) {
  if (accumulate) load_SFX(c, acc, nc);
  else if (bias) load_SFX(bias, acc, nc);
  else for (int j = 0; j < VPP; j++) acc[j] = (vec_SFX){0};
}

/* mr (a constant after inlining) rows x VPP vectors of accumulators: one broadcast of a
   row's element feeds VPP FMAs, one weight load feeds mr */
static inline __attribute__((always_inline)) void rows_SFX(int mr, const T_* restrict a, int64_t lda, int64_t K,
                                                          const T_* restrict wp, T_* restrict c, int64_t ldc, int64_t nc,
                                                          const T_* bias, int accumulate) {
  vec_SFX acc[8][VPP];
  for (int i = 0; i < mr; i++) start_SFX(acc[i], c + i * ldc, nc, bias, accumulate);
  for (int64_t k = 0; k < K; k++) {
    vec_SFX w[VPP];
    for (int j = 0; j < VPP; j++) w[j] = *(const vec_SFX*)(wp + k * NR_SFX + j * VL_SFX);
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
      T_ x = a[i * lda + k];
      for (int j = 0; j < VPP; j++) acc[i][j] += x * w[j];
    }
  }
  for (int i = 0; i < mr; i++) store_SFX(c + i * ldc, acc[i], nc);
}

/* one row (B = 1, or the rows left over): four accumulators over k hide the FMA latency */
static void row1_SFX(const T_* restrict a, int64_t K, const T_* restrict wp, T_* restrict c, int64_t nc,
                     const T_* bias, int accumulate) {
  vec_SFX acc[4][VPP] = {{{0}}};
  start_SFX(acc[0], c, nc, bias, accumulate);
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int u = 0; u < 4; u++)
      for (int j = 0; j < VPP; j++) acc[u][j] += a[k + u] * *(const vec_SFX*)(wp + (k + u) * NR_SFX + j * VL_SFX);
  for (; k < K; k++)
    for (int j = 0; j < VPP; j++) acc[0][j] += a[k] * *(const vec_SFX*)(wp + k * NR_SFX + j * VL_SFX);
  for (int j = 0; j < VPP; j++) acc[0][j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
  store_SFX(c, acc[0], nc);
}

/* forward panel p of a weight W [N, K] (rows contiguous): out[k][j] = W[p * NR + j][k], zero past row N */
static void pack_rows_SFX(const T_* restrict w, int64_t N, int64_t K, int64_t p, T_* restrict out) {
  for (int64_t j = 0; j < NR_SFX; j++) {
    int64_t n = p * NR_SFX + j;
    for (int64_t k = 0; k < K; k++) out[k * NR_SFX + j] = n < N ? w[n * K + k] : 0;
  }
}

/* backward panel p of W [L, H]: out[l][j] = W[l][p * NR + j], zero past column H */
static void pack_cols_SFX(const T_* restrict w, int64_t L, int64_t H, int64_t p, T_* restrict out) {
  int64_t nc = H - p * NR_SFX < NR_SFX ? H - p * NR_SFX : NR_SFX;
  for (int64_t l = 0; l < L; l++)
    for (int64_t j = 0; j < NR_SFX; j++) out[l * NR_SFX + j] = j < nc ? w[l * H + p * NR_SFX + j] : 0;
}

/* c[r, 0:nc] = (c[r] if accumulate, else bias if given, else 0) + a[r, :] @ wp for m rows */
static void panel_SFX(const T_* restrict a, int64_t lda, int64_t m, int64_t K, const T_* restrict wp,
                      T_* restrict c, int64_t ldc, int64_t nc, const T_* bias, int accumulate) {
  int64_t r = 0;
  for (; r + 8 <= m; r += 8) rows_SFX(8, a + r * lda, lda, K, wp, c + r * ldc, ldc, nc, bias, accumulate);
  if (r + 4 <= m) { rows_SFX(4, a + r * lda, lda, K, wp, c + r * ldc, ldc, nc, bias, accumulate); r += 4; }
  for (; r < m; r++) row1_SFX(a + r * lda, K, wp, c + r * ldc, nc, bias, accumulate);
}
"""


# The decode step's GEMMs (step_*): dot products on the weights as stored (a library of its own,
# built on the first layer.step(): a sequence forward never pays for its compile).
DOTS = """
#define VL_SFX ((int64_t)(VBYTES / sizeof(T_)))
#define NR_SFX (VPP * VL_SFX)
typedef T_ vec_SFX __attribute__((vector_size(VBYTES)));
typedef T_ uvec_SFX __attribute__((vector_size(VBYTES), aligned(sizeof(T_))));  /* unaligned rows of c */

/* c[r][j] = (c[r][j] if accumulate, else bias[j] if given, else 0) + a[r, :] . w[j, :] for m rows
   of a and n rows of w (both K long, rows contiguous): the decode step's GEMMs, on weights as
   stored. mr rows of a against 4 rows of w, vectors along k; then one horizontal sum each. */
static inline __attribute__((always_inline)) void dot_block_SFX(int mr, const T_* restrict a, int64_t lda,
    const T_* restrict w, int64_t ldw, int nw, int64_t K, T_* restrict c, int64_t ldc, const T_* bias, int accumulate) {
  vec_SFX acc[4][4];
  for (int i = 0; i < mr; i++) for (int j = 0; j < 4; j++) acc[i][j] = (vec_SFX){0};
  const T_* wr[4];
  for (int j = 0; j < 4; j++) wr[j] = w + (j < nw ? j : 0) * ldw;     /* short blocks repeat a row */
  int64_t k = 0;
  for (; k + VL_SFX <= K; k += VL_SFX) {
    vec_SFX wv[4];
    for (int j = 0; j < 4; j++) wv[j] = *(const uvec_SFX*)(wr[j] + k);
    for (int i = 0; i < mr; i++) {
      vec_SFX av = *(const uvec_SFX*)(a + i * lda + k);
      for (int j = 0; j < 4; j++) acc[i][j] += av * wv[j];
    }
  }
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < nw; j++) {
      T_ sum = 0;
      for (int v = 0; v < VL_SFX; v++) sum += acc[i][j][v];
      for (int64_t kk = k; kk < K; kk++) sum += a[i * lda + kk] * wr[j][kk];
      T_* out = c + i * ldc + j;
      *out = (accumulate ? *out : bias ? bias[j] : 0) + sum;
    }
}

static void dots_SFX(const T_* restrict a, int64_t lda, int64_t m, const T_* restrict w, int64_t ldw, int64_t n,
                     int64_t K, T_* restrict c, int64_t ldc, const T_* bias, int accumulate) {
  for (int64_t j = 0; j < n; j += 4) {
    int nw = n - j < 4 ? (int)(n - j) : 4;
    const T_* bj = bias ? bias + j : NULL;
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) dot_block_SFX(4, a + r * lda, lda, w + j * ldw, ldw, nw, K, c + r * ldc + j, ldc, bj, accumulate);
    for (; r < m; r++) dot_block_SFX(1, a + r * lda, lda, w + j * ldw, ldw, nw, K, c + r * ldc + j, ldc, bj, accumulate);
  }
}

"""


# -ffp-contract=fast: the GEMM's multiply-adds become FMAs (ISO C mode turns that off)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-ffp-contract=fast",
         "-shared", "-fPIC", "-std=c99"]


def build_library(src: str, stem: str, symbols: tuple[str, ...]) -> ctypes.CDLL:
    """A generated loop's library, from the kernel cache (kcache.py) or built now; BuildError
    (or OSError) when it cannot be had. Shared by the lane loop and general_loop.py."""
    cc = cpu_kernels._compiler()
    if cc is None:
        raise kcache.BuildError("no C compiler")
    key = hashlib.sha256(src.encode() + (cpu_kernels.CSRC / "vmath.h").read_bytes()
                         + cpu_kernels.machine_tag(cc, FLAGS)).hexdigest()[:20]

    def build(out: Path) -> None:
        c = out.with_suffix(".c")
        c.write_text(src)
        r = subprocess.run([cc, *FLAGS, f"-I{cpu_kernels.CSRC}", str(c), "-o", str(out), "-lm"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise kcache.BuildError(f"the generated loop did not compile: {r.stderr[:300]}")

    return kcache.load_library(f"{stem}-{key}", build, symbols)


def _compile(src: str) -> ctypes.CDLL:
    """The lane loop's library (forward, backward, panel width; float and double)."""
    return build_library(src, "loop", ("loop_f32", "loop_f64", "grad_f32", "grad_f64", "nr_f32", "nr_f64"))


def usable(dtype, *tensors) -> bool:
    """The fused path runs on CPU, in fp32/fp64, with a C compiler (with or without gradients)."""
    return dtype in (torch.float32, torch.float64) and cpu_kernels._compiler() is not None \
        and all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))


def toolchain_missing() -> str | None:
    """Why no generated C loop can run in this process, or None: the scan library is the
    probe (same compiler, flags, OpenMP and cache directory), built once per machine."""
    if cpu_kernels._compiler() is None:
        return "no C compiler (cc/gcc/clang) found"
    why = cpu_kernels.unavailable_reason()
    return f"the C toolchain does not work here: {why}" if why else None


class CompiledLoop:
    """What the generated forward calls for a `torch.c_loop` stage: FusedLoop (lane stages)
    and general_loop.GeneralLoop share this. A subclass builds its C source in __init__ and
    says how its library is built (`build`); here: the toolchain check (decided where the
    kernel is selected, so the plan never promises a C loop this process cannot build), and
    the library loaded on first use."""

    def _require_toolchain(self) -> None:
        why = toolchain_missing()
        if why:
            raise NotEligible(why)
        self.lib = None
        self.failed: dict[str, str] = {}    # library attribute -> why its build failed (not tried again)

    def build(self) -> ctypes.CDLL:
        raise NotImplementedError

    def usable(self, dtype, *tensors) -> bool:
        """`usable` for this loop, and its library loads (built on first use). A build that
        fails here (the generated C does not compile, the disk is full) warns once and the
        forward runs the per-step torch loop instead."""
        return usable(dtype, *tensors) and self._loaded("lib", self.build, "C loop", "running the per-step torch loop")

    def _loaded(self, attr: str, build, what: str, instead: str) -> bool:
        """self.<attr> holds the library `build` makes, built on first use; a build that fails
        warns once (naming `what` runs `instead`) and is not tried again."""
        if getattr(self, attr) is None:
            if attr in self.failed:
                return False
            try:
                setattr(self, attr, build())
            except (kcache.BuildError, OSError) as e:
                self.failed[attr] = str(e)
                warnings.warn(f"recdsl: the {what} of {', '.join(self.states)} could not be built ({e}); {instead} "
                              "instead", kcache.CacheWarning, stacklevel=3)
                return False
        return True

    def _fn(self, name: str, dtype):
        """The library's `name` function for dtype (the generated forward asked `usable` first)."""
        if self.lib is None:
            self.lib = self.build()
        return getattr(self.lib, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


class FusedLoop(CompiledLoop):
    """The runner the generated forward calls for an eligible loop stage."""

    def __init__(self, ir: IRCell, states: list[str], core: list[Node]):
        self.ir = ir
        self.gemms, region, self.leaves = plan_stage(ir, states, core)
        self.states = states
        self.params = [n for n in self.leaves if n.op == Op.PARAM]
        self.seqs = [n for n in self.leaves if n.op != Op.PARAM]
        self.folds = plan_folds(ir, self.gemms, self.seqs)
        folded = {f.seq.id: f.x for f in self.folds.values()}
        # what the generated forward passes per seq leaf: a folded projection's input x
        self.seq_args = [folded.get(n.id, n) for n in self.seqs]
        gen = _Gen(ir, states, self.gemms, self.params + self.seqs, self.folds)
        self.source = gen.source([ir.updates[s] for s in states], len(self.params), len(self.seqs))
        self.step_source, self.step_lib = gen.step_source, None    # layer.step()'s library, built on first use
        self.gemm_src = gen.gemm_src
        self.covered = gen.covered
        self.aliases = gen.aliases     # {input k: GEMM j}: the input's gradient is dgm_j
        self.fold_seq = gen.fold_seq   # {seq leaf k: GEMM j}: the leaf is j's projection, computed by the loop
        self.step_proj, self.seq_proj = gen.step_proj, gen.seq_proj   # the decode step's own projections
        self.gemm_lengths = [ir.shape_of(g)[0] for g in self.gemms]
        # a step's multiply-adds per (batch, head) row: threads pay for their barriers above 2^18 in all
        self.step_work = (sum(L * (gen.H + (gen.folds.get(k, 0))) for k, L in enumerate(self.gemm_lengths))
                          + sum(ir.shape_of(p)[0] * ir.shape_of(x)[0] for p, _, x, _ in gen.step_proj))
        self.keep = set(states)   # states whose whole sequence the forward reads (codegen narrows it)
        self._twin = None
        self._require_toolchain()

    def build(self) -> ctypes.CDLL:
        return _compile(self.source)

    def _panel_width(self, dtype) -> int:
        fn = self._fn("nr", dtype)
        fn.restype = ctypes.c_int64
        return int(fn())

    def run(self, seq_values: list, P0: dict, S0: dict, first_input, ns: int, dtype):
        """seq_values: whole-sequence tensors of self.seq_args (prefix [B, T, (heads)]).
        Returns ({state: sequence [B, T, (heads), H]} for the states in self.keep, {state: final}).
        Differentiable: with gradients the call saves what its C backward needs."""
        heads = ns == 3
        B, T = first_input.shape[:2]
        NH = first_input.shape[2] if heads else 1
        H = S0[self.states[0]].shape[-1]
        dims = _Dims(B, T, NH, H, dtype)
        xs = [_as_rows(x.to(dtype), node, ns) for x, node in zip(seq_values, self.seq_args)]
        params = [_per_head(P0[n.arg].to(dtype), n.rank, heads, NH) for n in self.params]
        weights = [_weight(g.srcs[0], P0).to(dtype) for g in self.gemms]
        weights = [_per_head(w, 2, heads, NH) if heads else w for w in weights]
        # dense [B * NH, H] (an initial state from a param is a stride-0 expand; the backward reads its rows)
        s0 = [S0[s].to(dtype).expand((B, NH, H) if heads else (B, H)).reshape(B * NH, H).contiguous()
              for s in self.states]
        projs = [t for k in sorted(self.folds) for t in self._projection(self.folds[k], P0, dtype, heads, NH)]
        tensors = xs + params + weights + s0 + projs
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            outs = _FusedFunction.apply(self, dims, *tensors)
            seqs, finals = outs[:len(self.states)], outs[len(self.states):]
        else:
            seqs, finals, _ = self.forward(dims, xs, params, weights, s0, projs, training=False)
        shape = (B, NH, H) if heads else (B, H)
        return ({s: (q if heads else q[:, :, 0]) for s, q in zip(self.states, seqs) if s in self.keep},
                {s: f.view(shape) for s, f in zip(self.states, finals)})

    def _projection(self, fold: Fold, P0: dict, dtype, heads: bool, NH: int) -> list[torch.Tensor]:
        """A folded projection's (W [L, D] or per head [NH, L, D], the sum of its biases [L] or
        [NH, L]) for the C call; the biases are summed here, under autograd."""
        return list(_weight_and_bias(P0, fold.weight, fold.biases, dtype))

    def chunk_steps(self, B: int, T: int, NH: int) -> int:
        """Steps per input projection of a folded GEMM: its rows of a chunk (half a
        MiB in float32 for every folded GEMM together) stay in cache until the steps read them."""
        rows = B * NH * sum(self.ir.shape_of(self.gemms[k])[0] for k in self.folds)
        return max(1, min(T, 64, (1 << 17) // max(1, rows)))

    def forward(self, dims, xs, params, weights, s0, projs, training: bool):
        """One C call over time. Returns (state sequences [B, T, NH, H] (a 1-step scratch for
        states nobody reads, unless training), final states [B * NH, H], saved GEMM outputs
        [B, T, NH, L] (training only; a folded GEMM's hold projection + W @ h))."""
        B, T, NH, H, dtype = dims
        vp, c_int = ctypes.c_void_p, ctypes.c_int64
        # Per state: two contiguous [B * NH, H] buffers the loop swaps (a fresh copy of S0, which
        # is never written), and the output sequence; a state whose sequence nobody reads
        # writes its rows to one scratch row block (time stride 0) instead of T of them.
        args, bufs, outs = [], [], []
        for s, h0 in zip(self.states, s0):
            full = training or s in self.keep
            buf = torch.empty((2, B * NH, H), dtype=dtype)
            buf[0].copy_(h0)
            o = torch.empty((B, T if full else 1, NH, H), dtype=dtype)
            bufs.append(buf)
            outs.append(o)
            args += [vp(buf[0].data_ptr()), vp(buf[1].data_ptr()), vp(o.data_ptr()), c_int(o.stride(0)),
                     c_int(o.stride(1) if full else 0)]
        # Per GEMM: the step's outputs [B, steps, NH, L] (every step's when training; a chunk's
        # ring for a folded GEMM, else one step's), the weight [heads, L, H] and room for its
        # panels [heads, L / NR, H, NR] (the kernel packs them). A folded GEMM also gets its
        # projection's input rows, weight, panels and bias, and the steps per chunk.
        nr = self._panel_width(dtype)
        gms, keep = [], []
        chunk = self.chunk_steps(B, T, NH)
        seq_of = {k: j for j, k in self.fold_seq.items()}
        for k, w in enumerate(weights):
            wh, L = (1, w.shape[0]) if w.dim() == 2 else w.shape[:2]
            w = w.reshape(wh, L, H).contiguous()
            panels = torch.empty((wh, -(-L // nr), H, nr), dtype=dtype)
            gm = torch.empty((B, T if training else chunk if k in self.folds else 1, NH, L), dtype=dtype)
            gms.append(gm)
            keep += [w, panels]
            args += [vp(gm.data_ptr()), c_int(gm.stride(0)), c_int(gm.stride(1)), c_int(gm.shape[1]),
                     vp(w.data_ptr()), vp(panels.data_ptr()), c_int(wh)]
            if k in self.folds:
                pw, bias = projs[2 * sorted(self.folds).index(k):][:2]
                pwh, D = (1, pw.shape[1]) if pw.dim() == 2 else (pw.shape[0], pw.shape[2])
                ppanels = torch.empty((pwh, -(-L // nr), D, nr), dtype=dtype)
                keep.append(ppanels)
                args += [_view(xs[seq_of[k]]), vp(pw.data_ptr()), vp(ppanels.data_ptr()), c_int(pwh),
                         vp(bias.data_ptr()), c_int(L if bias.dim() == 2 else 0), c_int(chunk)]
        args += [vp(p.data_ptr()) for p in params] + [_view(x) for x in xs]
        self._fn("loop", dtype)(*args, c_int(T), c_int(B), c_int(NH), c_int(self._threads(dims)))
        del keep
        finals = [buf[T % 2] for buf in bufs]
        return outs, finals, gms

    def _threads(self, dims) -> int:
        """Threads only when a step has enough work (lanes plus multiply-adds) to pay for its
        two barriers."""
        B, T, NH, H, _ = dims
        work = B * NH * H * (1 + sum(self.ir.shape_of(g)[0] for g in self.gemms))
        return torch.get_num_threads() if work >= 1 << 16 else 1

    def backward(self, dims, xs, params, weights, s0, projs, seqs, gms, g_seqs, g_finals):
        """One reverse C call, then dW as one GEMM per weight over all steps. Returns the
        gradients of (xs, params, weights, s0, projs)."""
        B, T, NH, H, dtype = dims
        vp, c_int = ctypes.c_void_p, ctypes.c_int64
        args, dd, keep = [], [], []
        for k, (q, h0) in enumerate(zip(seqs, s0)):
            g = g_seqs[k] if g_seqs[k] is not None else torch.zeros((1, 1, 1, H), dtype=dtype).expand(B, T, NH, H)
            if g.stride(3) != 1:   # the kernel reads a row's lanes at stride 1 (sum()'s gradient has stride 0)
                g = g.contiguous()
            d = torch.zeros((B * NH, H), dtype=dtype)     # the states' adjoints, seeded with the finals' gradients
            if g_finals[k] is not None:
                d.view(B, NH, H).copy_(g_finals[k].reshape(B, NH, H))
            dd.append(d)
            keep.append(g)
            args += [vp(q.data_ptr()), c_int(q.stride(0)), c_int(q.stride(1)), vp(h0.data_ptr()), _view(g),
                     vp(d.data_ptr())]
        nr = self._panel_width(dtype)
        dgms, gls = [], []
        for w, gm in zip(weights, gms):
            if w.dim() == 2 and NH > 1:   # the kernel's row strides assume per-head W with heads
                raise AssertionError("a weight shared by the heads reached the lane loop's backward")
            wh, L = (1, w.shape[0]) if w.dim() == 2 else w.shape[:2]
            w = w.reshape(wh, L, H).contiguous()
            panels = torch.empty((wh, -(-H // nr), L, nr), dtype=dtype)   # W by columns, packed by the kernel
            new = torch.empty if ("gemm", len(dgms)) in self.covered else torch.zeros
            dgm = new((B, T, NH, L), dtype=dtype)    # laid out as the inputs' gradients
            gl = torch.zeros((B * NH, H), dtype=dtype)
            dgms.append(dgm)
            gls.append(gl)
            keep += [w, panels]
            args += [vp(gm.data_ptr()), vp(dgm.data_ptr()), vp(w.data_ptr()), vp(panels.data_ptr()), c_int(wh),
                     vp(gl.data_ptr())]
        dps = [torch.zeros((B * NH, int(p.shape[-1]) if n.rank else 1), dtype=dtype)
               for p, n in zip(params, self.params)]
        dxs = [dgms[self.aliases[k]] if k in self.aliases else
               (torch.empty if ("seq", k) in self.covered else torch.zeros)((B, T, NH, x.shape[3]), dtype=dtype)
               for k, x in enumerate(xs)]
        for p, dp in zip(params, dps):
            args += [vp(p.data_ptr()), vp(dp.data_ptr())]
        for k, (x, dx) in enumerate(zip(xs, dxs)):
            args += [_view(x), vp(None if k in self.aliases else dx.data_ptr())]
        self._fn("grad", dtype)(*args, c_int(T), c_int(B), c_int(NH), c_int(self._threads(dims)))
        del keep
        d_s0 = list(dd)
        for g, gl in zip(self.gemm_src, gls):
            d_s0[g] = d_s0[g] + gl
        d_w = [_weight_grad(dgm, seqs[j], s0[j], w, dims) for dgm, j, w in zip(dgms, self.gemm_src, weights)]
        d_p = [dp.view(B, NH, -1).sum(0).reshape(p.shape) for dp, p in zip(dps, params)]
        d_proj = []
        for j, k in enumerate(sorted(self.folds)):   # the folded projections: x, W_x and bias from dgm
            seq = next(i for i, g in self.fold_seq.items() if g == k)
            dxs[seq], d_pw, d_b = _projection_grads(dgms[k], xs[seq], *projs[2 * j:2 * j + 2], dims)
            d_proj += [d_pw, d_b]
        d_x = [dx.sum_to_size(x.shape) for dx, x in zip(dxs, xs)]
        return d_x + d_p + d_w + d_s0 + d_proj

    def step_usable(self, dtype, *tensors) -> bool:
        """`usable` for layer.step(): its own library (step_*), built on the first call; a
        build that fails warns once and the reference step runs."""
        return usable(dtype, *tensors) and self._loaded(
            "step_lib", lambda: build_library(self.step_source, "lstep", ("step_f32", "step_f64")), "C step",
            "step() runs the reference step")

    def step(self, X: dict, S: dict, P0: dict, heads: bool, dtype) -> dict:
        """One step for decoding, in one C call (step_*): X the step's inputs [B, (NH,) ...],
        S the states [B, (NH,) H]; returns the new states. The caller (FusedStep) checked
        that every seq leaf is an input or a projection of one. A token's whole budget is
        tens of microseconds: sizes are known from __init__, and tensors already in the
        layout the C code reads are passed as they are."""
        vp, c_int = ctypes.c_void_p, ctypes.c_int64
        first = S[self.states[0]]
        B, H = first.shape[0], first.shape[-1]
        NH = first.shape[1] if heads else 1
        keep, args, nxt = [], [], []
        for s in self.states:
            prev = _state_rows(S[s], dtype, B, NH, H, heads)
            new = torch.empty((B * NH, H), dtype=dtype)
            keep.append(prev)
            nxt.append(new)
            args += [vp(prev.data_ptr()), vp(new.data_ptr())]
        for k, (g, L) in enumerate(zip(self.gemms, self.gemm_lengths)):
            w = _dense(_weight(g.srcs[0], P0), dtype)     # shared by the heads or per head: step_* reads both
            gm = torch.empty((B * NH, L), dtype=dtype)
            keep += [w, gm]
            args += [vp(gm.data_ptr()), vp(w.data_ptr()), c_int(1 if w.dim() == 2 else w.shape[0])]
            if k in self.folds:
                fold = self.folds[k]
                x = _dense(_step_rows(X[fold.x.arg], heads, B, NH), dtype)
                pw, bias = self._projection(fold, P0, dtype, heads, NH)
                keep += [x, pw, bias]
                args += [vp(x.data_ptr()), vp(pw.data_ptr()), c_int(1 if pw.dim() == 2 else pw.shape[0]),
                         vp(bias.data_ptr()), c_int(bias.shape[-1] if bias.dim() == 2 else 0)]
        params = [_per_head(_dense(P0[n.arg], dtype), n.rank, heads, NH) for n in self.params]
        keep += params
        args += [vp(p.data_ptr()) for p in params]
        for k, n in enumerate(self.seqs):
            if k in self.fold_seq or k in self.seq_proj:   # not a view: its GEMM or projection holds it
                args.append(cpu_kernels.View(0, 0, 0, 0, 0))
                continue
            rows = _step_rows(_dense(X[n.arg], dtype), heads, B, NH, n.rank)     # an input (FusedStep.eligible)
            keep.append(rows)
            args.append(cpu_kernels.View(rows.data_ptr(), *(st if size > 1 else 0 for st, size in
                                                            zip(rows.stride()[:2], rows.shape[:2])), 0, 1))
        for node, W, x, biases in self.step_proj:    # the gate inputs the step computes: b + x W^T
            xr = _dense(_step_rows(X[x.arg], heads, B, NH), dtype)
            w, bias = _weight_and_bias(P0, W, biases, dtype)
            out = torch.empty((B * NH, w.shape[-2]), dtype=dtype)
            keep += [xr, w, bias, out]
            args += [vp(xr.data_ptr()), vp(w.data_ptr()), c_int(1 if w.dim() == 2 else w.shape[0]),
                     vp(bias.data_ptr()), c_int(bias.shape[-1] if bias.dim() == 2 else 0), vp(out.data_ptr())]
        threads = torch.get_num_threads() if B * NH * self.step_work >= 1 << 18 else 1
        getattr(self.step_lib, f"step_{'f32' if dtype == torch.float32 else 'f64'}")(*args, c_int(B), c_int(NH),
                                                                                      c_int(threads))
        del keep
        return {s: v.view(B, NH, H) if heads else v for s, v in zip(self.states, nxt)}

    def twin(self):
        """The stage in differentiable torch ops, one step at a time, with the C call's
        signature (double backward: backends/torch/double_backward.py)."""
        if self._twin is None:
            from recdsl.torch_expr import compile_nodes
            ir = self.ir
            leaves = self.seqs + self.params + [g.srcs[0] for g in self.gemms] + [ir.states[s] for s in self.states]
            self._twin = compile_nodes([ir.updates[s] for s in self.states], leaves)
        return self._twin

    def twin_forward(self, dims, xs, params, weights, s0, projs):
        B, T, NH, H, dtype = dims
        step = self.twin()
        xs = list(xs)
        for j, k in enumerate(sorted(self.folds)):   # a folded leaf's value from its projection's input
            seq = next(i for i, g in self.fold_seq.items() if g == k)
            W, bias = projs[2 * j:2 * j + 2]
            proj = torch.einsum("bthd,hld->bthl", xs[seq], W) if W.dim() == 3 else xs[seq] @ W.T
            xs[seq] = proj + bias
        P = [p if p.dim() > n.rank else p[None] for p, n in zip(params, self.params)]   # prefix [1, NH]
        P = [p[None] for p in P] + [(w if w.dim() == 3 else w[None])[None] for w in weights]
        st = [h.view(B, NH, H) for h in s0]
        seqs = []
        for t in range(T):
            x_t = [x[:, t if x.shape[1] > 1 else 0] for x in xs]
            x_t = [x[..., 0] if n.rank == 0 else x for x, n in zip(x_t, self.seqs)]
            x_t = as_bool(x_t, self.seqs)
            new = step(x_t + P + st, 2, dtype, s0[0].device)
            st = [v.expand(B, NH, H) for v in new]
            seqs.append(st)
        outs = [torch.stack([s[k] for s in seqs], 1) for k in range(len(self.states))]
        return outs + [s.reshape(B * NH, H) for s in st]


_Dims = namedtuple("_Dims", "B T NH H dtype")   # one call's sizes, passed through the autograd Function


class _FusedFunction(torch.autograd.Function):
    """The fused loop under autograd: forward saves every step's GEMM outputs and the state
    sequences; backward is the generated reverse-time C loop (FusedLoop.backward). Under
    create_graph=True the backward re-runs the stage's torch twin instead."""

    @staticmethod
    def forward(ctx, loop, dims, *tensors):
        n = [len(loop.seqs), len(loop.params), len(loop.gemms), len(loop.states), 2 * len(loop.folds)]
        xs, params, weights, s0, projs = _split(tensors, n)
        seqs, finals, gms = loop.forward(dims, xs, params, weights, s0, projs, training=True)
        ctx.loop, ctx.dims, ctx.n = loop, dims, n
        ctx.save_for_backward(*tensors, *seqs, *gms)
        ctx.set_materialize_grads(False)    # an output nobody read has no gradient: not a tensor of zeros
        return (*seqs, *finals)

    @staticmethod
    def backward(ctx, *grads):
        loop, dims, n = ctx.loop, ctx.dims, ctx.n
        saved = ctx.saved_tensors
        inputs = saved[:sum(n)]
        seqs, gms = saved[sum(n):sum(n) + len(loop.states)], saved[sum(n) + len(loop.states):]
        if wants_graph(inputs, grads):
            return (None, None) + tuple(recompute_vjp(lambda *t: loop.twin_forward(dims, *_split(t, n)), inputs,
                                                      ctx.needs_input_grad[2:], grads))
        k = len(loop.states)
        got = loop.backward(dims, *_split(inputs, n), seqs, gms, list(grads[:k]), list(grads[k:]))
        return (None, None) + tuple(g if need else None for g, need in zip(got, ctx.needs_input_grad[2:]))


def as_bool(values: list, nodes: list) -> list:
    """Boolean leaves (a hoisted mask such as arange(H) >= 1) back as bool for the torch
    twins: the C loops read every leaf in the compute dtype, torch.where wants a bool
    condition."""
    return [v.bool() if n.is_bool else v for v, n in zip(values, nodes)]


def _weight_param(n: Node) -> Node | None:
    """The param of a recurrent GEMM's matrix: the param itself, or the param a slice
    `W[:, H:]` reads (what the analysis makes of `W @ concat(x, h)`)."""
    if n.op == Op.PARAM and n.rank == 2:
        return n
    if n.op == Op.INDEX and n.rank == 2 and n.srcs[0].op == Op.PARAM and n.srcs[0].rank == 2 \
            and all(isinstance(i, slice) for i in n.arg):
        return n.srcs[0]
    return None


def _weight(n: Node, P0: dict) -> torch.Tensor:
    """The GEMM matrix's value as stored (a view of the param for a slice), heads axis first."""
    p = P0[_weight_param(n).arg]
    return p if n.op == Op.PARAM else p[(Ellipsis,) + tuple(n.arg)]


def _split(tensors, counts):
    out, i = [], 0
    for c in counts:
        out.append(list(tensors[i:i + c]))
        i += c
    return out


def _weight_and_bias(P0: dict, W: Node, biases: list[Node], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight and the sum of its biases (zeros without any), dense in dtype;
    summed in torch, so under autograd the sum's gradient reaches every bias."""
    w = _dense(P0[W.arg], dtype)
    bs = [P0[b.arg] for b in biases]
    return w, _dense(sum(bs[1:], bs[0]) if bs else torch.zeros(w.shape[-2]), dtype)


def _dense(x: torch.Tensor, dtype) -> torch.Tensor:
    """x in dtype and contiguous, copied only when it is not already."""
    if x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def _state_rows(x: torch.Tensor, dtype, B: int, NH: int, H: int, heads: bool) -> torch.Tensor:
    """A state [B, (NH,) H] (maybe broadcast) as dense rows [B * NH, H]."""
    if x.dtype == dtype and x.is_contiguous() and x.numel() == B * NH * H:
        return x.view(B * NH, H)
    return x.to(dtype).expand((B, NH, H) if heads else (B, H)).reshape(B * NH, H).contiguous()


def _step_rows(x: torch.Tensor, heads: bool, B: int, NH: int, rank: int = 1) -> torch.Tensor:
    """A step's value [B, (NH,) L] (or a scalar [B, (NH)]) as [B|1, NH|1, L] with the
    feature axis at stride 1."""
    if rank == 0:
        x = x.unsqueeze(-1)
    if not heads:
        x = x.unsqueeze(1)
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def step_projections(seqs: list[Node], folded: set) -> tuple[list, dict]:
    """The decode step's input projections: ([(P, W, x, biases)] for every projection P =
    W @ x + b of an input that a seq leaf is, or slices along its last axis (a GRU's
    gates), {seq leaf k: (projection index, offset)}. Leaves that are neither stay views."""
    projs, index, where = [], {}, {}
    for k, n in enumerate(seqs):
        if k in folded or n.op == Op.INPUT:
            continue
        base, off = (n.srcs[0], n.arg[0].start or 0) if _last_axis_slice(n) else (n, 0)
        parts = projection(base)
        if parts is None or parts[1].op != Op.INPUT:
            continue
        if base.id not in index:
            index[base.id] = len(projs)
            projs.append((base, *parts))
        where[k] = (index[base.id], off)
    return projs, where


def _last_axis_slice(n: Node) -> bool:
    return n.op == Op.INDEX and len(n.arg) == 1 and isinstance(n.arg[0], slice) and n.rank == 1 \
        and n.arg[0].step in (None, 1)


class FusedStep:
    """layer.step() of a cell that is one lane loop (an LSTM, a GRU, an Elman RNN): one C
    call per token (FusedLoop.step) instead of the reference's op-by-op step. Where the C
    call cannot run (not CPU float, gradients wanted, the build failed), the reference
    step runs, as before."""

    stored_params = True     # the runtime passes the params as stored (the reference step: a batch axis first)

    def __init__(self, ir: IRCell, loop: FusedLoop, fallback):
        self.ir, self.loop = ir, loop
        # the reference step reads P with a leading batch axis
        self.fallback = lambda X, S, P, nb, dtype, device: fallback(X, S, {n: p[None] for n, p in P.items()}, nb,
                                                                      dtype, device)
        self.outputs = {o: next(s for s in loop.states if ir.updates[s] is n) for o, n in ir.outputs.items()}

    @staticmethod
    def eligible(ir: IRCell, loops: list, stages: int) -> "FusedLoop | None":
        """The cell's one lane loop when it is the whole cell: one stage, every seq leaf an
        input or a projection of one, every output a new state of the loop."""
        if stages != 1 or len(loops) != 1 or not isinstance(loops[0], FusedLoop):
            return None
        loop = loops[0]
        news = {id(ir.updates[s]) for s in loop.states}
        if not ir.outputs or any(id(n) not in news for n in ir.outputs.values()):
            return None
        if not all(k in loop.fold_seq or k in loop.seq_proj or n.op == Op.INPUT for k, n in enumerate(loop.seqs)):
            return None
        if any(f.x.op != Op.INPUT for f in loop.folds.values()):
            return None
        return loop

    def __call__(self, X, S, P, nb, dtype, device):
        loop = self.loop
        tensors = [*X.values(), *P.values(), *S.values()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.fallback(X, S, P, nb, dtype, device)
        # the library loaded already: the per-token checks are the dtype and the devices
        ready = loop.step_lib is not None and dtype in (torch.float32, torch.float64) and all(t.is_cpu for t in tensors)
        if not ready and not loop.step_usable(dtype, *tensors):
            return self.fallback(X, S, P, nb, dtype, device)
        new = loop.step(X, S, P, nb == 2, dtype)
        return new, {o: new[s] for o, s in self.outputs.items()}


def _as_rows(x: torch.Tensor, node: Node, ns: int) -> torch.Tensor:
    """A whole-sequence leaf as [B|1, T|1, NH|1, L] with the feature axis at stride 1 (what the
    generated code reads)."""
    while x.dim() < ns + 1:
        x = x.unsqueeze(-1)
    if ns == 2:
        x = x.unsqueeze(2)
    if node.rank == 1 and x.stride(3) != 1:
        x = x.contiguous()
    return x


def _per_head(p: torch.Tensor, rank: int, heads: bool, NH: int) -> torch.Tensor:
    """A param with its heads axis (a param shared by the heads is expanded), contiguous."""
    if heads and p.dim() == rank:
        p = p.expand((NH,) + tuple(p.shape))
    return p.contiguous()


def _view(x: torch.Tensor) -> cpu_kernels.View:
    """The C view of a [B, T, NH, L] tensor: size-1 (broadcast) axes get stride 0."""
    strides = [st if size > 1 else 0 for st, size in zip(x.stride(), x.shape)]
    sb, st, sh, sf = strides
    return cpu_kernels.View(x.data_ptr(), sb, sh, st, sf)


def _projection_grads(dgm, x, W, bias, dims):
    """The gradients of a folded projection W @ x + bias from its output's adjoint dgm
    [B, T, NH, L] (x: the [B|1, T|1, NH|1, D] rows the loop read): dx and dW as GEMMs over
    every step (dW shares dgm's transpose with the recurrent weight's gradient), the bias's
    as a sum."""
    B, T, NH, _, _ = dims
    L, D = dgm.shape[-1], x.shape[-1]
    x = x.expand(B, T, NH, D)
    if W.dim() == 2:
        g = dgm.view(-1, L)
        d_x = gemm.mm_t(g, W.T).view(B, T, NH, D)
        d_w = gemm.tn(g, x.reshape(-1, D), share=True)
    else:   # per head [NH, L, D]
        d_x = torch.einsum("bthl,hld->bthd", dgm, W)
        d_w = torch.einsum("bthl,bthd->hld", dgm, x)
    d_b = dgm.sum((0, 1)) if bias.dim() == 2 else dgm.sum((0, 1, 2))
    return d_x, d_w, d_b


def _weight_grad(dgm, seq, h0, w, dims):
    """dW = sum over steps and rows of dgm[t]^T h[t-1]: one GEMM (per head for per-head W)
    over every step at once, the states before each step laid out [B, T] like dgm. The
    transposed dgm is shared with the backward pass (gemm.tn): where dgm is also an input's
    gradient (aliases), the hoisted projection's weight gradient reads the same transpose."""
    B, T, NH, H, _ = dims
    L = dgm.shape[-1]
    prev = torch.empty((B, T, NH, H), dtype=seq.dtype)   # [B, T] like dgm: a shift, not a transpose
    prev[:, 0] = h0.view(B, NH, H)
    prev[:, 1:] = seq[:, :-1]
    if w.dim() == 2:
        return gemm.tn(dgm.view(-1, L), prev.view(-1, H), share=True)
    return torch.bmm(dgm.view(B * T, NH, L).permute(1, 2, 0), prev.view(B * T, NH, H).transpose(0, 1))
