"""Sequential kernels for nonlinear and dense stages: the time loop runs inside the kernel.

One program per (block of BLOCK_B batch rows, head). The states live in registers as
[BLOCK_B, n] tiles for the whole sequence; the recurrent weights are loaded once, before
the loop, and held in registers (per head, as FlashRNN does); a stage whose weights do not
fit (HOLD_LIMIT) runs the torch loop instead, and says so -- splitting the hidden units
across programs is not built. The hoisted projections are read per step. Each step is the stage's recurrent core, generated from
the IR.

Triton cannot slice a register tile, so every value is computed at the *window* (offset,
length) of its last axis that its users read: `z[0:H]` of `z = W @ h + u` becomes
`W[0:H] @ h + u[0:H]` -- the LSTM's four gate GEMMs are four [H, H] weight tiles, never a
4H vector. A value is a vnode = (node, window).

Backward (derived): a reverse-time loop. The states are saved by the forward (it writes
the sequences anyway); each step's intermediates are recomputed from h_{t-1}, then the
step's reverse mode (texpr.vjp for elementwise ops, the transposed weight tile for
GEMMs) gives the adjoint of h_{t-1} (the carry), of each leaf at t (written per
element) and of the params (accumulated in registers over the loop, written once per
program and summed in torch: deterministic, no atomics)."""
from __future__ import annotations

from dataclasses import dataclass

from recdsl.ir import Node, Op
from recdsl.torch_expr import SourceNotes

from . import texpr
from .fusion import annotate, sum_text, vjp_reading
from .fusion import pow2 as _pow2

HOLD_LIMIT = 2048         # weight elements (padded) per head held in registers across the loop: above it
                          # the backward spills on sm_80/sm_90 (LSTM H = 32: 4096 spill-free forward only)
DOT_MIN = 16              # tl.dot needs every side >= 16 on a GPU; below, multiply and sum


class NotEligible(Exception):
    pass


@dataclass(frozen=True)
class Win:
    off: int
    len: int            # 0: a scalar per row (a [BLOCK_B, 1] tile)

    @property
    def width(self) -> int:
        return max(1, _pow2(self.len))

    def overlaps(self, o: "Win") -> bool:
        return self.off < o.off + max(o.len, 1) and o.off < self.off + max(self.len, 1)


@dataclass
class Gemm:
    node: Node
    win: Win
    param: Node
    x: Node            # the vector operand
    transposed: bool   # W @ x (True: the tile is W[rows]^T) or x @ W (False)
    K: int             # contraction length


class SeqKernel:
    def __init__(self, ir, sp, core: list[Node], notes: SourceNotes):
        self.ir, self.notes = ir, notes
        self.states = list(sp.states)
        self.name = f"{ir.name.lower()}_stage{sp.index}_{'_'.join(self.states)}"
        self.core_ids = {n.id for n in core}
        for s in self.states:
            if ir.states[s].rank > 1:
                raise NotEligible(f"state {s} is not a vector")
        self._num: dict[int, int] = {}
        self.order: list[tuple[Node, Win]] = []     # vnodes, sources first
        self.seen: set = set()
        self.leaves: list[Node] = []                # per-step sequence values
        self.leaf_wins: dict[int, list[Win]] = {}
        self.params: list[Node] = []                # vector params read elementwise / matrix params of GEMMs
        self.param_wins: dict[int, list[Win]] = {}
        self.gemms: list[Gemm] = []
        self.gemm_index: dict = {}                  # (matmul id, window) -> its index in gemms
        for s in self.states:
            self._visit(ir.updates[s], self._full(ir.updates[s]))
        for key, wins in list(self.leaf_wins.items()) + list(self.param_wins.items()):
            if any(a.overlaps(b) for i, a in enumerate(wins) for b in wins[i + 1:]):
                raise NotEligible("a value is read at overlapping slices")
        for x in self.leaves + self.params:   # loads and gradient stores of a scalar are one column wide
            if x.rank == 0 and any(w.width > 1 for w in self.leaf_wins.get(x.id, []) + self.param_wins.get(x.id, [])):
                raise NotEligible(f"the scalar {x.arg} is broadcast against a vector in the step (not built in the "
                                  "sequential kernel)")
        rows = {}
        for g in self.gemms:
            if any(g.win.overlaps(w) for w in rows.get(g.param.id, [])):
                raise NotEligible("a weight is used twice at the same rows")
            rows.setdefault(g.param.id, []).append(g.win)
        weights = sum(_pow2(g.K) * g.win.width for g in self.gemms)
        if weights > HOLD_LIMIT:
            raise NotEligible(f"the recurrent weights ({weights} elements per head) do not fit one program's "
                              f"registers (<= {HOLD_LIMIT}); splitting the hidden units across programs "
                              "(FlashRNN-style) is not built")

    # ------------------------------------------------------------------ analysis
    def _full(self, n: Node) -> Win:
        if n.rank == 0:
            return Win(0, 0)
        if n.rank == 1:
            return Win(0, self.ir.shape_of(n)[0])
        raise NotEligible(f"{n.op.name.lower()} on a matrix in the step")

    def key(self, n: Node, w: Win):
        return (n.id, w)

    def _src_win(self, n: Node, w: Win, s: Node) -> Win:
        """The window of source s that n, computed at window w, reads."""
        if n.op == Op.INDEX:
            i = n.arg[0]
            return Win(w.off + (i.start or 0), w.len) if isinstance(i, slice) else \
                Win(i % self.ir.shape_of(s)[0], 1)
        if texpr.fusable(n) and s.rank == n.rank == 1:
            return w
        return self._full(s)

    def _src_name(self, n: Node, w: Win):
        return lambda s: self.vname(s, self._src_win(n, w, s))

    def _visit(self, n: Node, w: Win):
        """Record the vnode (n, w) and what it reads, sources first, in self.order (depth
        first, sources in order), with an explicit stack: an unrolled loop makes chains
        thousands of nodes deep."""
        stack: list = [(n, lambda: w, None)]
        while stack:
            x, xw, done = stack.pop()
            if done is not None:
                done()
                self.order.append((x, xw))
                continue
            xw = xw()   # a source's window, found when it is visited (as the recursion did)
            srcs = self._enter(x, xw)
            if srcs is None:
                continue
            reads, after = srcs
            stack.append((x, xw, after))
            stack.extend((s, sw, None) for s, sw in reversed(reads))

    def _enter(self, n: Node, w: Win):
        """First visit of (n, w): checks it, records a leaf; for a core value, the sources
        it reads with their windows (as functions: a window is found, or refused, when its
        source is visited) and what to record after them. None when there is nothing to
        visit (a literal, a vnode seen, a state, a leaf)."""
        if texpr.literal(n) is not None or self.key(n, w) in self.seen:
            return None
        self.seen.add(self.key(n, w))
        if n.op == Op.STATE and n.arg[0] in self.states:
            if w != self._full(n):
                raise NotEligible("a slice of a state")
            return None
        if n.id not in self.core_ids:   # a leaf: a param or a per-step sequence value
            if n.rank > 1:
                raise NotEligible("a matrix read elementwise")
            if n.op == Op.CONST or n.op == Op.EYE:
                raise NotEligible("a constant vector")
            bucket, wins = (self.params, self.param_wins) if n.op == Op.PARAM else (self.leaves, self.leaf_wins)
            if n.id not in wins:
                bucket.append(n)
            wins.setdefault(n.id, []).append(w)
            self.order.append((n, w))
            return None
        op = n.op
        nothing = lambda: None  # noqa: E731
        if texpr.fusable(n) or (op == Op.EXPAND and n.srcs[0].rank == 0 and n.rank == 1):
            return [(s, lambda s=s: self._src_win(n, w, s)) for s in n.srcs], nothing
        if op == Op.INDEX and n.srcs[0].rank == 1 and len(n.arg) == 1:
            i = n.arg[0]
            if not isinstance(i, (slice, int)) or (isinstance(i, slice) and i.step not in (None, 1)):
                raise NotEligible("a strided slice or another indexing form")
            return [(n.srcs[0], lambda: self._src_win(n, w, n.srcs[0]))], nothing
        if op == Op.MATMUL and n.rank == 1:
            a, b = n.srcs
            if a.op == Op.PARAM and a.rank == 2 and b.rank == 1 and a.id not in self.core_ids:
                g = Gemm(n, w, a, b, True, self.ir.shape_of(b)[0])
            elif b.op == Op.PARAM and b.rank == 2 and a.rank == 1 and b.id not in self.core_ids:
                g = Gemm(n, w, b, a, False, self.ir.shape_of(a)[0])
            else:
                raise NotEligible("a matmul that is not weight @ vector")

            def record():
                self.gemm_index[(n.id, w)] = len(self.gemms)
                self.gemms.append(g)
            xw = self._full(g.x)
            return [(g.x, lambda: xw)], record
        if op == Op.DOT or (op in (Op.SUM, Op.AMAX) and n.srcs[0].rank == 1):
            return [(s, lambda s=s: self._full(s)) for s in n.srcs], nothing
        raise NotEligible(f"{op.name.lower()} in the step")

    # ------------------------------------------------------------------ names
    def vname(self, n: Node, w: Win) -> str:
        lit = texpr.literal(n)
        if lit is not None:
            return lit
        if n.op == Op.STATE and n.arg[0] in self.states:
            return f"h{self.states.index(n.arg[0])}"
        full = self._full(n) if n.rank <= 1 else None
        k = self._num.setdefault(n.id, len(self._num))   # numbered in order: names do not depend on ids
        return f"v{k}" if w == full else f"v{k}_{w.off}_{w.len}"

    def cols(self, w: Win) -> str:
        return f"cols{w.width}"

    def cmask(self, w: Win) -> str:
        return f"(cols{w.width} < {max(w.len, 1)})[None, :]"

    def _gemm_tile(self, gi: int) -> list[str]:
        g = self.gemms[gi]
        p = self.params_all().index(g.param)
        KP, LP = _pow2(g.K), g.win.width
        i, j = f"tl.arange(0, {KP})[:, None]", f"({g.win.off} + tl.arange(0, {LP}))[None, :]"
        ptr = (f"p{p} + hd * p{p}_sh + {j} * p{p}_sr + {i} * p{p}_sc" if g.transposed
               else f"p{p} + hd * p{p}_sh + {i} * p{p}_sr + {j} * p{p}_sc")
        mask = f"(tl.arange(0, {KP})[:, None] < {g.K}) & (tl.arange(0, {LP})[None, :] < {g.win.len})"
        what = f"{g.param.arg}[{g.win.off}:{g.win.off + g.win.len}]" + ("^T" if g.transposed else "")
        return [f"w{gi} = tl.load({ptr}, mask={mask}, other=0.0).to(ACC)  # {what}: [{KP}, {LP}]"]

    def params_all(self) -> list[Node]:
        out = list(self.params)
        for g in self.gemms:
            if g.param not in out:
                out.append(g.param)
        return out

    def arg_names(self, backward: bool) -> list[str]:
        args = []
        for i in range(len(self.leaves)):
            args += [f"l{i}", f"l{i}_sb", f"l{i}_st", f"l{i}_sh", f"l{i}_sn"]
        for j in range(len(self.params_all())):
            args += [f"p{j}", f"p{j}_sh", f"p{j}_sr", f"p{j}_sc"]
        for k in range(len(self.states)):
            args += [f"hinit{k}", f"hseq{k}"] + ([f"dhseq{k}", f"dhfin{k}", f"dh0{k}"] if backward else [f"hfin{k}"])
        if backward:
            args += [f"dl{i}" for i in range(len(self.leaves))] + [f"dp{j}" for j in range(len(self.params_all()))]
        return args + ["B", "T", "NH", "TL", "cu"]

    def slen(self, k: int) -> int:
        st = self.ir.states[self.states[k]]
        return self.ir.shape_of(st)[0] if st.rank else 1

    # ------------------------------------------------------------------ shared code
    def _setup(self, L: list[str], need: set | None = None):
        """The kernel's prologue: program ids, rows, lane ranges, the params held in
        registers (the vector params' windows in `need` only, when given)."""
        widths = sorted({w.width for _, w in self.order} | {_pow2(self.slen(k)) for k in range(len(self.states))}
                        | {g.win.width for g in self.gemms} | {_pow2(g.K) for g in self.gemms})
        L += ["    pid = tl.program_id(0)",
              "    hd = tl.program_id(1).to(tl.int64)",
              "    rb = pid * BLOCK_B + tl.arange(0, BLOCK_B)",
              "    bm = rb < B",
              "    if VARLEN:  # row rb is sequence rb of cu_seqlens, packed along T of a batch of one",
              "        bos = tl.load(cu + rb, mask=bm, other=0).to(tl.int64)",
              "        Tn = tl.load(cu + rb + 1, mask=bm, other=0).to(tl.int64) - bos",
              "        bb = rb.to(tl.int64) * 0",
              "    else:",
              "        bos = rb.to(tl.int64) * 0",
              "        Tn = bos + T",
              "        bb = rb.to(tl.int64)"]
        L += [f"    cols{w} = tl.arange(0, {w})" for w in widths]
        for j, p in enumerate(self.params):   # vector params: loaded once
            for w in self.param_wins[p.id]:
                if need is not None and self.key(p, w) not in need:
                    continue
                idx = f"({w.off} + {self.cols(w)})[None, :] * p{j}_sr" if p.rank else "tl.zeros([1, 1], tl.int64)"
                L.append(annotate(f"    {self.vname(p, w)} = tl.load(p{j} + hd * p{j}_sh + {idx}, "
                                  f"mask={self.cmask(w)}, other=0.0).to(ACC)", self.notes(p, with_text=False)))
        for gi in range(len(self.gemms)):   # the recurrent weights: loaded once, held in registers
            L += ["    " + x for x in self._gemm_tile(gi)]

    def _state_ptr(self, k: int, base: str, t: str | None) -> tuple[str, str]:
        """Pointers and mask of state k's tile: per row at memory step t ([BLOCK_B] vector;
        rows not running at this step masked), or of the [B, NH, n] initial/final state."""
        n = self.slen(k)
        W = _pow2(n)
        if t is None:
            return (f"{base} + (rb[:, None] * NH + hd) * {n} + cols{W}[None, :]",
                    f"bm[:, None] & (cols{W} < {n})[None, :]")
        return (f"{base} + ((bb[:, None] * T + {t}[:, None]) * NH + hd) * {n} + cols{W}[None, :]",
                f"act[:, None] & (cols{W} < {n})[None, :]")

    def _leaf_loads(self, L: list[str], t: str, need: set | None = None):
        for i, x in enumerate(self.leaves):
            for w in self.leaf_wins[x.id]:
                if need is not None and self.key(x, w) not in need:
                    continue
                idx = f"({w.off} + {self.cols(w)})[None, :] * l{i}_sn" if x.rank else "tl.zeros([1, 1], tl.int64)"
                ptr = f"l{i} + bb[:, None] * l{i}_sb + {t}[:, None] * l{i}_st + hd * l{i}_sh + {idx}"
                val = f"tl.load({ptr}, mask=act[:, None] & {self.cmask(w)}, other=0.0)"
                val = f"{val} != 0" if x.is_bool else f"{val}.to(ACC)"
                L.append(annotate(f"        {self.vname(x, w)} = {val}", self.notes(x, with_text=False)))

    def _step(self, L: list[str], need: set | None = None):
        """The core's values in order (leaves are loaded already); only those in `need`,
        when given (the backward recomputes what its adjoint reads)."""
        for n, w in self.order:
            if n.id not in self.core_ids or (need is not None and self.key(n, w) not in need):
                continue
            name = self._src_name(n, w)
            if texpr.fusable(n):
                rhs = texpr.expr(n, name)
            elif n.op == Op.INDEX:
                rhs = name(n.srcs[0])
            elif n.op == Op.EXPAND:
                rhs = f"{name(n.srcs[0])} + tl.zeros([BLOCK_B, {w.width}], dtype=ACC)"
            elif n.op == Op.MATMUL:
                gi = self.gemm_index[(n.id, w)]
                g = self.gemms[gi]
                xin = f"tl.where({self.cmask(self._full(g.x))}, {self.vname(g.x, self._full(g.x))}, 0.0)"
                rhs = self._matmul(xin, f"w{gi}", _pow2(g.K), w.width)
            elif n.op == Op.DOT:
                a, b = (self.vname(s, self._full(s)) for s in n.srcs)
                rhs = f"tl.sum(tl.where({self.cmask(self._full(n.srcs[0]))}, {a} * {b}, 0.0), 1, keep_dims=True)"
            elif n.op == Op.SUM:
                s = n.srcs[0]
                rhs = f"tl.sum(tl.where({self.cmask(self._full(s))}, {self.vname(s, self._full(s))}, 0.0), 1, keep_dims=True)"
            elif n.op == Op.AMAX:
                s = n.srcs[0]
                rhs = (f"tl.max(tl.where({self.cmask(self._full(s))}, {self.vname(s, self._full(s))}, "
                       f"float(\"-inf\")), 1, keep_dims=True)")
            else:  # pragma: no cover - _visit refuses the rest
                raise NotEligible(n.op.name)
            L.append(annotate(f"        {self.vname(n, w)} = {rhs}", self.notes(n)))

    @staticmethod
    def _matmul(x: str, w: str, K: int, N: int) -> str:
        if min(K, N) >= DOT_MIN:
            return f"tl.dot({x}, {w}, input_precision=\"ieee\")"
        return f"tl.sum({x}[:, :, None] * {w}[None, :, :], 1)"

    # ------------------------------------------------------------------ forward
    def forward(self) -> str:
        L = ["@triton.jit",
             f"def {self.name}_fwd({', '.join(self.arg_names(False))},",
             "        ACC: tl.constexpr, BLOCK_B: tl.constexpr, VARLEN: tl.constexpr, REVERSE: tl.constexpr, "
             + ", ".join(f"STORE{k}: tl.constexpr" for k in range(len(self.states))) + "):",
             f"    # stage {', '.join(self.states)}: the time loop on chip; weights held in registers"]
        self._setup(L)
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"hinit{k}", None)
            L.append(f"    h{k} = tl.load({ptr}, mask={mask}, other=0.0).to(ACC)")
        L += ["    for t in range(0, TL):",
              "        act = bm & (t < Tn)  # the rows still running (cu_seqlens: sequences differ in length)",
              "        tm = bos + t  # the step in memory",
              "        if REVERSE:",
              "            tm = bos + Tn - 1 - t"]
        self._leaf_loads(L, "tm")
        self._step(L)
        for k, s in enumerate(self.states):
            new = self.ir.updates[s]
            nm = self.vname(new, self._full(new))
            ptr, mask = self._state_ptr(k, f"hseq{k}", "tm")
            L.append(f"        n{k} = tl.where({mask}, {nm}, h{k})")
            L.append(f"        if STORE{k}:  # the sequence is read (by the driver or a gradient)")
            L.append(f"            tl.store({ptr}, n{k}, mask={mask})")
        for k in range(len(self.states)):
            L.append(f"        h{k} = n{k}")
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"hfin{k}", None)
            L.append(f"    tl.store({ptr}, h{k}, mask={mask})")
        return "\n".join(L) + "\n"

    # ------------------------------------------------------------------ backward
    def backward(self) -> str:
        L = ["@triton.jit",
             f"def {self.name}_bwd({', '.join(self.arg_names(True))},",
             "        ACC: tl.constexpr, BLOCK_B: tl.constexpr, HAS_DSEQ: tl.constexpr, VARLEN: tl.constexpr,"
             " REVERSE: tl.constexpr):",
             f"    # adjoint of stage {', '.join(self.states)}: reverse-time loop of the step's VJP (states saved, "
             "the step recomputed)"]
        params = self.params_all()
        # the step's reverse mode first: the forward values it reads are all the step recomputes
        reads: set = set()
        adjoint = self._adjoint(reads, params)
        need = self._needed(reads)
        self._setup(L, need)
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"dhfin{k}", None)
            L.append(f"    lam{k} = tl.load({ptr}, mask={mask}, other=0.0).to(ACC)")
        for j, p in enumerate(self.params):
            for w in self.param_wins[p.id]:
                L.append(f"    acc_{self.vname(p, w)} = tl.zeros([1, {w.width}], dtype=ACC)")
        for gi, g in enumerate(self.gemms):
            L.append(f"    dw{gi} = tl.zeros([{_pow2(g.K)}, {g.win.width}], dtype=ACC)")
        L += ["    for r in range(0, TL):",
              "        t = TL - 1 - r",
              "        act = bm & (t < Tn)",
              "        tm = bos + t"]
        h_read = [k for k in range(len(self.states)) if self._state_key(k) in need]
        if h_read:   # h_{t-1} at step t - 1 in memory
            L += ["        tp = bos + tl.maximum(t - 1, 0)"]
        L += ["        if REVERSE:",
              "            tm = bos + Tn - 1 - t"]
        if h_read:
            L += ["            tp = bos + Tn - 1 - tl.maximum(t - 1, 0)"]
        for k in h_read:  # h_{t-1}: the saved sequence, or the initial state
            p1, mask = self._state_ptr(k, f"hseq{k}", "tp")
            p0, _ = self._state_ptr(k, f"hinit{k}", None)
            L.append(f"        h{k} = tl.where(t > 0, tl.load({p1}, mask={mask}, other=0.0), "
                     f"tl.load({p0}, mask={mask}, other=0.0)).to(ACC)")
        self._leaf_loads(L, "tm", need)
        self._step(L, need)
        L += adjoint
        for k in range(len(self.states)):
            ptr, mask = self._state_ptr(k, f"dh0{k}", None)
            L.append(f"    tl.store({ptr}, lam{k}, mask={mask})")
        # param partials: [programs, NH, *shape], this program's slice
        for j, p in enumerate(self.params):
            for w in self.param_wins[p.id]:
                n = self.ir.shape_of(p)[0] if p.rank else 1
                L.append(f"    tl.store(dp{j} + (pid * NH + hd) * {n} + ({w.off} + {self.cols(w)})[None, :], "
                         f"acc_{self.vname(p, w)}, mask={self.cmask(w)})")
        for gi, g in enumerate(self.gemms):
            j = params.index(g.param)
            R, Cc = self.ir.shape_of(g.param)
            KP, LP = _pow2(g.K), g.win.width
            i, jj = f"tl.arange(0, {KP})[:, None]", f"({g.win.off} + tl.arange(0, {LP}))[None, :]"
            off = f"{jj} * {Cc} + {i}" if g.transposed else f"{i} * {Cc} + {jj}"
            mask = f"(tl.arange(0, {KP})[:, None] < {g.K}) & (tl.arange(0, {LP})[None, :] < {g.win.len})"
            L.append(f"    tl.store(dp{j} + (pid * NH + hd) * {R * Cc} + {off}, dw{gi}, mask={mask})")
        return "\n".join(L) + "\n"

    def _state_key(self, k: int):
        st = self.ir.states[self.states[k]]
        return self.key(st, self._full(st))

    def _adjoint(self, reads: set, params) -> list[str]:
        """The lines of one step's reverse mode (inside the time loop, after the recomputed
        step): the new states' adjoints seeded, each vnode's adjoint from its readers', the
        leaves' gradients stored or accumulated, the carried adjoints of h_{t-1}. Adds to
        `reads` the keys of the forward vnodes the lines read."""
        L: list[str] = []
        adj: dict = {}
        for k, s in enumerate(self.states):
            new = self.ir.updates[s]
            ptr, mask = self._state_ptr(k, f"dhseq{k}", "tm")
            L += ["        if HAS_DSEQ:",
                  f"            lam{k} += tl.load({ptr}, mask={mask}, other=0.0).to(ACC)"]
            adj.setdefault(self.key(new, self._full(new)), []).append(f"lam{k}")
        for n, w in reversed(self.order):
            parts = adj.pop(self.key(n, w), None)
            if not parts:
                continue
            g = "g" + self.vname(n, w)[1:]
            pre, total = sum_text(parts, g)   # (a value read thousands of times: lines of at most 64 terms)
            L += ["        " + x for x in pre]
            L.append(annotate(f"        {g} = tl.where(act[:, None] & {self.cmask(w)}, {total}, 0.0)",
                              self.notes(n, with_text=False)))
            if n.id not in self.core_ids:
                self._leaf_grad(L, n, w, g, params)
                continue
            for (src, sw), contrib in self._vjp(L, n, w, g, reads):
                if contrib is not None and texpr.literal(src) is None:
                    if sw.len == 0 and w.len > 0 and n.op != Op.EXPAND and texpr.fusable(n):
                        contrib = f"tl.sum({contrib}, 1, keep_dims=True)"   # broadcast scalar: sum its uses
                    adj.setdefault(self.key(src, sw), []).append(contrib)
        for k, s in enumerate(self.states):
            st = self.ir.states[s]
            parts = adj.pop(self.key(st, self._full(st)), None)
            _, mask = self._state_ptr(k, "x", "t")
            pre, total = sum_text(parts, f"lamsum{k}") if parts else ([], "0.0")
            L += ["        " + x for x in pre]
            L.append(f"        lam{k} = tl.where({mask}, {total}, lam{k})"
                     f" + tl.zeros([BLOCK_B, {_pow2(self.slen(k))}], dtype=ACC)  # rows not running keep theirs")
        return L

    def _fwd_reads(self, n: Node, w: Win) -> list[tuple[Node, Win]]:
        """The vnodes the forward line of the core vnode (n, w) reads (literals aside)."""
        if n.op == Op.MATMUL:
            g = self.gemms[self.gemm_index[(n.id, w)]]
            srcs = [(g.x, self._full(g.x))]
        else:
            srcs = [(s, self._src_win(n, w, s)) for s in n.srcs]
        return [(s, sw) for s, sw in srcs if texpr.literal(s) is None]

    def _needed(self, reads: set) -> set:
        """The keys of the vnodes the backward loads or recomputes: those its adjoint reads
        and, sources first in self.order, everything they are computed from."""
        need = set(reads)
        for n, w in reversed(self.order):
            if n.id in self.core_ids and self.key(n, w) in need:
                need |= {self.key(s, sw) for s, sw in self._fwd_reads(n, w)}
        return need

    def _leaf_grad(self, L, n, w, g, params):
        if n.op == Op.PARAM:
            L.append(f"        acc_{self.vname(n, w)} += tl.sum({g}, 0, keep_dims=True)")
            return
        i = self.leaves.index(n)
        idx = f"({w.off} + {self.cols(w)})[None, :]" if n.rank else "tl.zeros([1, 1], tl.int64)"
        nn = self.ir.shape_of(n)[0] if n.rank else 1
        ptr = f"dl{i} + ((bb[:, None] * T + tm[:, None]) * NH + hd) * {nn} + {idx}"
        L.append(f"        tl.store({ptr}, {g} + tl.zeros([BLOCK_B, {w.width}], dtype=ACC), "
                 f"mask=act[:, None] & {self.cmask(w)})")

    def _vjp(self, L, n: Node, w: Win, g: str, reads: set):
        """[((src, window), contribution)] of a core vnode; adds to `reads` the keys of the
        forward vnodes the contributions (and lines added to L) read."""
        if texpr.fusable(n):
            wins = [self._src_win(n, w, s) for s in n.srcs]
            contribs, read, reads_out = vjp_reading(n, g, self._src_name(n, w), self.vname(n, w))
            reads |= {self.key(s, self._src_win(n, w, s)) for s in read}
            if reads_out:
                reads.add(self.key(n, w))
            return list(zip(zip(n.srcs, wins), contribs))
        if n.op == Op.INDEX:
            return [((n.srcs[0], self._src_win(n, w, n.srcs[0])), g)]
        if n.op == Op.EXPAND:
            return [((n.srcs[0], Win(0, 0)), f"tl.sum({g}, 1, keep_dims=True)")]
        if n.op == Op.MATMUL:
            gi = self.gemm_index[(n.id, w)]
            gm = self.gemms[gi]
            xw = self._full(gm.x)
            xin = f"tl.where(act[:, None] & {self.cmask(xw)}, {self.vname(gm.x, xw)}, 0.0)"
            reads.add(self.key(gm.x, xw))
            KP, LP = _pow2(gm.K), w.width
            if min(KP, LP) >= DOT_MIN:
                L.append(f"        dw{gi} += tl.dot(tl.trans({xin}), {g}, input_precision=\"ieee\")")
            else:
                L.append(f"        dw{gi} += tl.sum({xin}[:, :, None] * {g}[:, None, :], 0)")
            # g @ W^T always as a product-sum: tl.dot here (with or without tl.trans) crashes
            # LLVM's SLP vectorizer in Triton 3.9 for sm_90 (seen at H = 16 and 32)
            return [((gm.x, xw), f"tl.sum({g}[:, None, :] * w{gi}[None, :, :], 2)")]
        if n.op == Op.DOT:
            a, b = n.srcs
            wa, wb = self._full(a), self._full(b)
            reads |= {self.key(a, wa), self.key(b, wb)}
            return [((a, wa), f"({g} * {self.vname(b, wb)})"), ((b, wb), f"({g} * {self.vname(a, wa)})")]
        if n.op == Op.SUM:
            s = n.srcs[0]
            sw = self._full(s)
            return [((s, sw), f"({g} + tl.zeros([BLOCK_B, {sw.width}], dtype=ACC))")]
        if n.op == Op.AMAX:
            s = n.srcs[0]
            sw = self._full(s)
            reads |= {self.key(s, sw), self.key(n, w)}
            return [((s, sw), f"tl.where({self.vname(s, sw)} == {self.vname(n, w)}, {g}, 0.0)")]
        raise NotEligible(n.op.name)  # pragma: no cover

    def combines(self) -> list[str]:
        return []

    def constexprs(self, backward: bool, acc) -> dict:
        out = {"ACC": acc, "BLOCK_B": 16, "VARLEN": False, "REVERSE": False}   # launch._block_b on a GPU
        if backward:
            out["HAS_DSEQ"] = True
        else:
            out.update({f"STORE{k}": True for k in range(len(self.states))})
        return out
