"""Parallel scan kernels for linear stages: diagonal, semiring (max-plus, log-sum-exp) and
k x k block-diagonal, forward and backward, generated per stage.

Layout: one program per (block of BLOCK_C channels, batch row); it walks T in chunks of
BLOCK_T, scans each [BLOCK_T, BLOCK_C] tile with `tl.associative_scan` along time and
carries the last row into the next chunk. Channels are the flattened (heads, *state
shape), at most three axes C0 x C1 x C2; every leaf is read through its own strides, so
broadcast leaves (a per-channel param, a per-head gate) are never materialised. The
cell's coefficient math is the kernel's prologue (`Region`), so one launch per stage
reads each leaf once and writes the state sequence and the final state once.

Backward (derived, one launch): chunks in reverse time order, each tile loaded with its
rows reversed, so the adjoint recurrence lambda_t = dh_t + c_{t+1} lambda_{t+1} is again
a forward `associative_scan` (no `reverse=True`, which has had bugs upstream).
c_{t+1} = dh_{t+1}/dh_t is recomputed from the prologue at t+1 (recompute, not saved);
the states h are saved by the forward (it writes them anyway). The local derivatives of
h_t in a_t and b_t seed the prologue's reverse mode (`Region.backward_lines`), which
gives each leaf's gradient, written per element and reduced to the leaf's shape in torch.

Epilogue: outputs that are elementwise in the new states (and leaves) are computed in the
kernel and written instead of the states (`ScanSpec.outputs`); a *fused readout*
`y = h' @ q` of a [.., N] state (Mamba's `h' @ C`) is reduced over N in registers, and
outputs elementwise in the readouts (`+ D * x`) follow it (`ScanSpec.reduced`), so the
[B, T, D, N] states never reach memory in inference (STORE_SEQ off: nothing else reads
them, and no gradient is needed). In readout mode the channel lanes of a program are
BLOCK_C // NP rows of the outer channels times NP (N padded to a power of two), so that
`tl.reshape` + `tl.sum` reduce each row. Backward: the outputs' adjoints seed the
epilogue's reverse mode before the scan, adding to the adjoint of h_t.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from recdsl.ir import Node, Op, toposort
from recdsl.torch_expr import SourceNotes

from .fusion import Region, annotate, resolve
from .texpr import literal

IDENTITY = {"diag": ("1.0", "0.0"), "maxplus": ("0.0", 'float("-inf")'), "lse": ("0.0", 'float("-inf")')}


@dataclass
class ScanSpec:
    name: str
    kind: str                  # diag | maxplus | lse | block
    k: int                     # states coupled (1 unless block)
    A: list[list[Node | None]]  # A[i][j]: coefficient of state j in state i's update (None: 0, or 1 on the diagonal of k=1)
    b: list[Node | None]
    states: list[str]
    updates: list[Node] = field(default_factory=list)      # the new state values (epilogue inputs)
    outputs: list[Node] = field(default_factory=list)      # elementwise in the new states: [B, T, C]
    readouts: list[tuple[Node, int, Node]] = field(default_factory=list)  # (h' @ q node, state index, q)
    reduced: list[Node] = field(default_factory=list)      # elementwise in the readouts: [B, T, C / N]
    n_p2: int = 1                                          # the readout axis N, padded to a power of two
    rax: int = 2                                           # the state axis readouts reduce: 2 last, 1 first
    opaque: set = field(default_factory=set)               # ids the prologue reads as leaves: other stages' cores


def combine_source(kind: str, k: int) -> str:
    """The associative combine of (A, b) pairs: `left` is earlier in the scan order."""
    if kind == "diag":
        return ("@triton.jit\ndef _combine_diag(a1, b1, a2, b2):\n"
                "    return a1 * a2, a2 * b1 + b2\n")
    if kind == "maxplus":
        return ("@triton.jit\ndef _combine_maxplus(a1, b1, a2, b2):\n"
                "    return a1 + a2, tl.maximum(a2 + b1, b2)\n")
    if kind == "lse":
        return ("@triton.jit\ndef _combine_lse(a1, b1, a2, b2):\n"
                "    return a1 + a2, _logaddexp(a2 + b1, b2)\n")
    # block: (A1, b1) then (A2, b2) -> (A2 A1, A2 b1 + b2)
    left = [f"l{i}{j}" for i in range(k) for j in range(k)] + [f"lb{i}" for i in range(k)]
    right = [f"r{i}{j}" for i in range(k) for j in range(k)] + [f"rb{i}" for i in range(k)]
    outs = []
    for i in range(k):
        for j in range(k):
            outs.append(" + ".join(f"r{i}{m} * l{m}{j}" for m in range(k)))
    for i in range(k):
        outs.append(" + ".join(f"r{i}{m} * lb{m}" for m in range(k)) + f" + rb{i}")
    return (f"@triton.jit\ndef _combine_block{k}({', '.join(left + right)}):\n"
            f"    return {', '.join(outs)}\n")


def _combine_name(kind, k):
    return f"_combine_block{k}" if kind == "block" else f"_combine_{kind}"


class ScanKernel:
    """Generates the forward and backward kernel text of one scan stage."""

    def __init__(self, spec: ScanSpec, notes: SourceNotes):
        self.spec, self.notes = spec, notes
        self.name = spec.name
        roots = [a for row in spec.A for a in row] + list(spec.b)
        num: dict = {}   # value numbers shared by the kernel's regions
        self.region = Region(roots, numbering=num, opaque=spec.opaque)
        stop = {u.id for u in spec.updates}
        # epilogue at the state's granularity: the outputs and the readout vectors q
        self.epi = Region(list(spec.outputs) + [q for _, _, q in spec.readouts], stop, num)
        # epilogue at the readouts' granularity (one value per row of N)
        self.red = Region(list(spec.reduced), {r.id for r, _, _ in spec.readouts}, num)
        self.readout_mode = bool(spec.readouts)
        self.leaves = list(self.region.leaves)
        for x in self.epi.leaves:
            if all(x.id != y.id for y in self.leaves):
                self.leaves.append(x)
        self.rleaves = list(self.red.leaves)
        self.leaf_names = {x.id: f"x{i}" for i, x in enumerate(self.leaves)}
        self.rleaf_names = {x.id: f"rx{j}" for j, x in enumerate(self.rleaves)}
        self.upd_names = {u.id: f"hs{i}" for i, u in enumerate(spec.updates)}
        self.read_names = {r.id: f"y{j}" for j, (r, _, _) in enumerate(spec.readouts)}
        # leaves that do not vary over time (params and what is computed from them only) are
        # loaded once per program, before the time loop
        self.invariant = {x.id for x in self.leaves if _time_invariant(x)}

    def arg_names(self, backward: bool) -> list[str]:
        sp = self.spec
        outs = [f"of{i}" for i in range(len(sp.outputs))] + [f"or{j}" for j in range(len(sp.reduced))]
        if backward:
            return self._params() + [f"d{i}" for i in range(len(self.leaves))] + \
                [f"dr{j}" for j in range(len(self.rleaves))] + \
                ["hinit", "hseq", "dhseq", "dhfin", "dh0"] + ["d" + o for o in outs] + ["T", "C", "C1", "C2", "cu"]
        return self._params() + ["hinit", "hseq", "hfin"] + outs + ["T", "C", "C1", "C2", "cu"]

    def constexprs(self, backward: bool, acc) -> dict:
        """The GPU configuration (launch.Blocks.scan on a GPU) as compiled ahead of time."""
        from .launch import Blocks
        bt, bc = Blocks.gpu(self.spec.k, backward)
        out = {"ACC": acc, "BLOCK_T": bt, "BLOCK_C": bc, ("HAS_DSEQ" if backward else "STORE_SEQ"): True,
               "VARLEN": False, "REVERSE": False}
        if self.readout_mode:
            out["NP"] = self.np
            out["BLOCK_C"] = max(bc, self.np)
        return out

    @property
    def np(self) -> int:
        """N (the readout axis) padded to a power of two."""
        return self.spec.n_p2


    def combines(self) -> list[str]:
        sp = self.spec
        back = "diag" if sp.k == 1 else "block"
        return [combine_source(sp.kind, sp.k), combine_source(back, sp.k)]

    # ------------------------------------------------------------------ shared pieces
    def _params(self) -> list[str]:
        out = []
        for i in range(len(self.leaves)):
            out += [f"l{i}", f"l{i}_sb", f"l{i}_st", f"l{i}_s0", f"l{i}_s1", f"l{i}_s2"]
        for j in range(len(self.rleaves)):
            out += [f"rl{j}", f"rl{j}_sb", f"rl{j}_st", f"rl{j}_s0", f"rl{j}_s1", f"rl{j}_s2"]
        return out

    def _head(self, lines, loaded: set | None = None, rloaded: set | None = None):
        """Program ids, lanes and channels, and each leaf's base offset: of the leaves (ids)
        in `loaded` / `rloaded` only, when given (a backward loads fewer)."""
        leaves = [i for i, x in enumerate(self.leaves) if loaded is None or x.id in loaded]
        rleaves = [j for j, x in enumerate(self.rleaves) if rloaded is None or x.id in rloaded]
        lines += ["    pid_c = tl.program_id(0)",
                  "    b = tl.program_id(1).to(tl.int64)  # a batch row, or a sequence of cu_seqlens",
                  "    if VARLEN:  # sequences packed along T of a batch of one",
                  "        bos = tl.load(cu + b).to(tl.int64)",
                  "        Tn = tl.load(cu + b + 1).to(tl.int64) - bos",
                  "        bb = b * 0",
                  "    else:",
                  "        bos = 0",
                  "        Tn = T",
                  "        bb = b",
                  "    lane = tl.arange(0, BLOCK_C)",
                  "    rows = tl.arange(0, BLOCK_T)"]
        # the readouts' coordinates (r0, r1, r2) are read only by the readout leaves' offsets
        rcoords = []
        if self.readout_mode and self.spec.rax == 2:   # lanes: BLOCK_C // NP outer rows x NP (the last axis, padded)
            lines += ["    CO = C // C2  # outer channels (one readout each)",
                      "    ro = pid_c * (BLOCK_C // NP) + tl.arange(0, BLOCK_C // NP)",
                      "    omask = ro < CO",
                      "    rol = pid_c * (BLOCK_C // NP) + lane // NP",
                      "    c2 = lane % NP",
                      "    cmask = (rol < CO) & (c2 < C2)",
                      "    c = rol * C2 + c2  # the channel in the [B, T, C] layout",
                      "    c1 = rol % C1",
                      "    c0 = rol // C1"]
            rcoords = ["    r2 = ro * 0", "    r1 = ro % C1", "    r0 = ro // C1"]
        elif self.readout_mode:   # the readout reduces the state's first axis (q @ S): lanes x NP of C1
            lines += ["    CO = C // C1  # outer channels (one readout each)",
                      "    ro = pid_c * (BLOCK_C // NP) + tl.arange(0, BLOCK_C // NP)",
                      "    omask = ro < CO",
                      "    rol = pid_c * (BLOCK_C // NP) + lane // NP",
                      "    c1 = lane % NP",
                      "    cmask = (rol < CO) & (c1 < C1)",
                      "    c2 = rol % C2",
                      "    c0 = rol // C2",
                      "    c = (c0 * C1 + c1) * C2 + c2  # the channel in the [B, T, C] layout"]
            rcoords = ["    r2 = ro % C2", "    r1 = ro * 0", "    r0 = ro // C2"]
        else:
            lines += ["    c = pid_c * BLOCK_C + lane",
                      "    cmask = c < C"]
            if leaves:   # the channel's coordinates: read by the leaves' offsets only
                lines += ["    c0 = c // (C1 * C2)",
                          "    c1 = (c // C2) % C1",
                          "    c2 = c % C2"]
        if rleaves:
            lines += rcoords
        for i in leaves:
            lines.append(f"    l{i}_c = bb * l{i}_sb + c0 * l{i}_s0 + c1 * l{i}_s1 + c2 * l{i}_s2")
        for j in rleaves:
            lines.append(f"    rl{j}_c = bb * rl{j}_sb + r0 * rl{j}_s0 + r1 * rl{j}_s1 + r2 * rl{j}_s2")

    def _invariant_loads(self, lines, only: set | None = None):
        for i, x in enumerate(self.leaves):
            if x.id in self.invariant and (only is None or x.id in only):
                load = f"tl.load(l{i} + l{i}_c[None, :], mask=cmask[None, :], other=1.0)"
                val = f"{load} != 0" if x.is_bool else f"{load}.to(ACC)"
                lines.append(annotate(f"    x{i} = {val}  # constant over time: [1, BLOCK_C]",
                                      self.notes(x, with_text=False)))

    def _loads(self, lines, tvar: str, mvar: str, suffix: str = "", only=None):
        """Each leaf's [BLOCK_T, BLOCK_C] tile at times `tvar` (inside the time loop)."""
        for i, x in enumerate(self.leaves):
            if only is not None and x.id not in only:
                continue
            if x.id in self.invariant:
                if suffix:
                    lines.append(f"        x{i}{suffix} = x{i}")
                continue
            load = (f"tl.load(l{i} + l{i}_c[None, :] + {tvar}[:, None] * l{i}_st, mask={mvar}, other=1.0)")
            val = f"{load} != 0" if x.is_bool else f"{load}.to(ACC)"
            lines.append(annotate(f"        x{i}{suffix} = {val}", self.notes(x, with_text=False)))

    def _coef(self, n: Node | None, default: str, suffix: str = "") -> str:
        if n is None:
            return default
        if _is_literal(n):   # a constant coefficient as a tile of the accumulator type (a bare
            return f"tl.full([BLOCK_T, BLOCK_C], {literal(n)}, ACC)"   # literal tile would be fp32)
        return self.region.name_fn({k: v + suffix for k, v in self.leaf_names.items()}, suffix)(n)

    def _entries(self, suffix=""):
        """(A entries row-major, b entries) as expressions, identities filled in."""
        sp = self.spec
        k = sp.k
        if sp.kind != "block":
            one, zero = IDENTITY[sp.kind]
            return [self._coef(sp.A[0][0], one, suffix)], [self._coef(sp.b[0], zero if sp.kind == "diag" else
                                                                      'float("-inf")', suffix)]
        A = [self._coef(sp.A[i][j], "0.0", suffix) for i in range(k) for j in range(k)]
        return A, [self._coef(sp.b[i], "0.0", suffix) for i in range(k)]

    def _identity(self):
        sp = self.spec
        if sp.kind != "block":
            one, zero = IDENTITY[sp.kind]
            return [one], [zero]
        k = sp.k
        return ["1.0" if i == j else "0.0" for i in range(k) for j in range(k)], ["0.0"] * k

    def _coef_nodes(self, A: bool = True, b: bool = True) -> list[Node]:
        """The step's coefficient nodes: the A entries (row-major) and/or the b entries."""
        return ([a for row in self.spec.A for a in row] if A else []) + (list(self.spec.b) if b else [])

    def _prologue(self, lines, suffix="", roots=None):
        """The coefficients' math (the values `roots` need; all coefficients by default)."""
        names = {k: v + suffix for k, v in self.leaf_names.items()}
        roots = self._coef_nodes() if roots is None else roots
        for ln in self.region.forward_lines(roots, names, self.notes, suffix):
            lines.append("        " + ln)

    def _apply(self, k, kind, A, B, h):
        """h_t = (scanned A, B) applied to the carry h (lists of names)."""
        if kind == "diag":
            return [f"{A[0]} * {h[0]}[None, :] + {B[0]}"]
        if kind == "maxplus":
            return [f"tl.maximum({A[0]} + {h[0]}[None, :], {B[0]})"]
        if kind == "lse":
            return [f"_logaddexp({A[0]} + {h[0]}[None, :], {B[0]})"]
        return [" + ".join(f"{A[i * k + j]} * {h[j]}[None, :]" for j in range(k)) + f" + {B[i]}" for i in range(k)]

    # ------------------------------------------------------------------ forward
    def forward(self) -> str:
        sp, k = self.spec, self.spec.k
        lines = ["@triton.jit",
                 f"def {sp.name}_fwd({', '.join(self.arg_names(False))},",
                 "        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, STORE_SEQ: tl.constexpr,"
                 " VARLEN: tl.constexpr, REVERSE: tl.constexpr"
                 + (", NP: tl.constexpr):" if self.readout_mode else "):"),
                 f"    # stage {', '.join(sp.states)}: {sp.kind} scan" + (f" of {k} coupled states" if k > 1 else "")]
        self._head(lines)
        for i in range(k):  # states interleaved: [B, C, k]
            lines.append(f"    h{i} = tl.load(hinit + (b * C + c) * {k} + {i}, mask=cmask, other=0.0).to(ACC)")
        self._invariant_loads(lines)
        lines += ["    for t0 in range(0, Tn, BLOCK_T):",
                  "        t = t0 + rows  # the step in scan order",
                  "        tm = bos + t  # ... and in memory",
                  "        if REVERSE:",
                  "            tm = bos + Tn - 1 - t",
                  "        m = (t < Tn)[:, None] & cmask[None, :]"]
        self._loads(lines, "tm", "m")
        self._prologue(lines)
        A, B = self._entries()
        ia, ib = self._identity()
        names_a = [f"e{i}" for i in range(len(A))]
        names_b = [f"f{i}" for i in range(len(B))]
        for nm, e, ident in zip(names_a + names_b, A + B, ia + ib):
            lines.append(f"        {nm} = tl.where(m, {e}, {ident}).to(ACC)  # masked lanes: the identity")
        sa = [f"sa{i}" for i in range(len(A))]
        sb = [f"sb{i}" for i in range(len(B))]
        lines.append(f"        {', '.join(sa + sb)} = tl.associative_scan(({', '.join(names_a + names_b)},), 0, "
                     f"{_combine_name(sp.kind, k)})")
        hs = self._apply(k, sp.kind, sa, sb, [f"h{i}" for i in range(k)])
        for i in range(k):
            lines.append(f"        hs{i} = {hs[i]}")
        for i in range(k):
            lines += ["        if STORE_SEQ:",
                      f"            tl.store(hseq + ((bb * T + tm[:, None]) * C + c[None, :]) * {k} + {i}, hs{i}, mask=m)"]
        self._epilogue_forward(lines, self.upd_names)
        for i, o in enumerate(sp.outputs):
            lines.append(f"        tl.store(of{i} + (bb * T + tm[:, None]) * C + c[None, :], {self._epi_name(o)}, mask=m)")
        for j, o in enumerate(sp.reduced):
            lines.append(f"        tl.store(or{j} + (bb * T + tm[:, None]) * CO + ro[None, :], "
                         f"{self._red_name(o)}, mask=mo)")
        for i in range(k):  # the carry: the last row (masked rows past T are identities)
            red = "tl.max" if sp.kind in ("maxplus", "lse") else "tl.sum"
            fill = 'float("-inf")' if sp.kind in ("maxplus", "lse") else "0.0"
            lines.append(f"        h{i} = {red}(tl.where(rows[:, None] == BLOCK_T - 1, hs{i}, {fill}), 0)")
        for i in range(k):
            lines.append(f"    tl.store(hfin + (b * C + c) * {k} + {i}, h{i}, mask=cmask)")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ backward
    # ------------------------------------------------------------------ epilogue
    def _epi_name(self, n: Node) -> str:
        return self.epi.name_fn({**self.leaf_names, **self._upd})(n)

    def _red_name(self, n: Node) -> str:
        return self.red.name_fn({**self.rleaf_names, **self.read_names})(n)

    def _epilogue_forward(self, lines, upd_names: dict, need: set | None = None):
        """The outputs computed from the new states (named by upd_names) in registers. In a
        backward, `need` holds the ids of the values its reverse mode reads: only those are
        computed (with what they are computed from, whose ids are added to `need`)."""
        sp = self.spec
        self._upd = upd_names
        if need is None:   # the forward kernel: every output and readout
            red_roots, rleaves = list(sp.reduced), list(self.rleaves)
            ys = list(range(len(sp.readouts)))
            epi_roots = list(sp.outputs) + [q for _, _, q in sp.readouts]
        else:              # what the reverse mode reads, and (last to first) what that reads
            red_roots = [r for r in self.red.nodes if r.id in need]
            need |= self.red.reads_of(red_roots)
            rleaves = [x for x in self.rleaves if x.id in need]
            ys = [j for j, (r, _, _) in enumerate(sp.readouts) if r.id in need]
            need |= {resolve(sp.readouts[j][2]).id for j in ys} | {sp.updates[sp.readouts[j][1]].id for j in ys}
            epi_roots = [r for r in self.epi.nodes if r.id in need]
            need |= self.epi.reads_of(epi_roots)
        for ln in self.epi.forward_lines(epi_roots, {**self.leaf_names, **upd_names}, self.notes):
            lines.append("        " + ln)
        for j in ys:
            r, si, q = sp.readouts[j]
            hname = upd_names[sp.updates[si].id]
            lines.append(annotate(f"        y{j} = tl.sum(tl.reshape(tl.where(m, {hname} * {self._epi_name(q)}, 0.0), "
                                  f"[BLOCK_T, BLOCK_C // NP, NP]), 2)  # fused readout: [BLOCK_T, BLOCK_C // NP]",
                                  self.notes(r)))
        if need is None and sp.readouts:   # (a backward has its mask already: its adjoints' loads read it)
            lines.append("        mo = (t < Tn)[:, None] & omask[None, :]")
        for x in rleaves:
            j = self.rleaves.index(x)
            load = f"tl.load(rl{j} + rl{j}_c[None, :] + tm[:, None] * rl{j}_st, mask=mo, other=1.0)"
            val = f"{load} != 0" if x.is_bool else f"{load}.to(ACC)"
            lines.append(annotate(f"        rx{j} = {val}", self.notes(x, with_text=False)))
        for ln in self.red.forward_lines(red_roots, {**self.rleaf_names, **self.read_names}, self.notes):
            lines.append("        " + ln)

    def _epilogue_backward(self, lines, reads: set) -> dict[int, list[str]]:
        """Reverse mode of the epilogue at step t (forward values recomputed from the saved
        h_t): stores the reduced leaves' gradients, accumulates the full leaves' into ge{i}
        and returns, per state index, the terms it adds to the adjoint of h_t. The ids of the
        forward values the lines read are added to `reads`."""
        sp = self.spec
        add: dict[int, list[str]] = {}
        grads_q: dict[int, list[str]] = {}
        if sp.readouts:
            seeds = {}
            for j, o in enumerate(sp.reduced):
                lines.append(f"        gor{j} = tl.load(dor{j} + (bb * T + tm[:, None]) * CO + ro[None, :], mask=mo, "
                             f"other=0.0).to(ACC)")
                seeds[resolve(o).id] = f"gor{j}"
            names = {x.id: f"grx{j}" for j, x in enumerate(self.rleaves)}
            names.update({resolve(r).id: f"gy{j}" for j, (r, _, _) in enumerate(sp.readouts)})
            for ln in self.red.backward_lines(seeds, {**self.rleaf_names, **self.read_names}, self.notes, names,
                                              reads):
                lines.append("        " + ln)
            for j in range(len(self.rleaves)):
                lines.append(f"        tl.store(dr{j} + (bb * T + tm[:, None]) * CO + ro[None, :], grx{j}"
                             f" + tl.zeros([BLOCK_T, BLOCK_C // NP], dtype=ACC), mask=mo)")
            for j, (r, si, q) in enumerate(sp.readouts):
                lines.append(f"        gyb{j} = tl.reshape(tl.broadcast_to(gy{j}[:, :, None], "
                             f"[BLOCK_T, BLOCK_C // NP, NP]), [BLOCK_T, BLOCK_C])")
                add.setdefault(si, []).append(f"gyb{j} * {self._epi_name(q)}")
                grads_q.setdefault(resolve(q).id, []).append(f"gyb{j} * {self._upd[sp.updates[si].id]}")
                reads |= {resolve(q).id, sp.updates[si].id}
        seeds = {}
        for i, o in enumerate(sp.outputs):
            lines.append(f"        gof{i} = tl.load(dof{i} + (bb * T + tm[:, None]) * C + c[None, :], mask=m, "
                         f"other=0.0).to(ACC)")
            seeds.setdefault(resolve(o).id, []).append(f"gof{i}")
        for qid, parts in grads_q.items():
            seeds.setdefault(qid, []).extend(parts)
        seed_names = {}
        for i, (nid, parts) in enumerate(seeds.items()):
            lines.append(f"        se{i} = tl.where(m, {' + '.join(parts)}, 0.0)")
            seed_names[nid] = f"se{i}"
        names = {x.id: f"ge{i}" for i, x in enumerate(self.leaves) if any(x.id == y.id for y in self.epi.leaves)}
        names.update({u.id: f"gu{i}" for i, u in enumerate(sp.updates)})
        for ln in self.epi.backward_lines(seed_names, {**self.leaf_names, **self._upd}, self.notes, names, reads):
            lines.append("        " + ln)
        for i in range(len(sp.updates)):
            add.setdefault(i, []).append(f"gu{i}")
        return add

    def _local(self, kind, k, A, B, hp, h):
        """(c, da, db): dh_t/dh_{t-1} per (i, j), and dh_t/da, dh_t/db per entry, as expressions
        of the step's coefficients, previous and new state (what each reads: LOCAL_READS)."""
        if kind == "diag":
            return [A[0]], [hp[0]], ["1.0"]
        if kind == "maxplus":
            sel = f"tl.where({A[0]} + {hp[0]} >= {B[0]}, 1.0, 0.0)"
            return [sel], [sel], [f"(1.0 - {sel})"]
        if kind == "lse":
            w = f"tl.exp({A[0]} + {hp[0]} - {h[0]})"
            return [w], [w], [f"tl.exp({B[0]} - {h[0]})"]
        return list(A), None, ["1.0"] * k

    def backward(self) -> str:
        """The adjoint kernel. Its reverse mode at step t is built first: what it reads is all
        the kernel loads and recomputes (the step's values, the next step's transition, the
        saved states), so no value is computed that nothing reads."""
        sp, k = self.spec, self.spec.k
        lines = ["@triton.jit",
                 f"def {sp.name}_bwd({', '.join(self.arg_names(True))},",
                 "        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DSEQ: tl.constexpr,"
                 " VARLEN: tl.constexpr, REVERSE: tl.constexpr"
                 + (", NP: tl.constexpr):" if self.readout_mode else "):"),
                 f"    # adjoint of stage {', '.join(sp.states)}: reverse-time {sp.kind} scan, chunks last to first"]
        self._upd = {u.id: f"h{i}" for i, u in enumerate(sp.updates)}   # h_t: the saved new states
        need: set = set()              # ids of the values at step t the lines read
        hp_read: set[int] = set()      # the previous states h_{t-1} read (by index)
        h_read: set[int] = set()       # the new states h_t read (by index)

        def local(what: set, i: int):
            """Record what a local derivative of state i (LOCAL_READS) reads."""
            coefs = self._coef_nodes(A="A" in what, b="B" in what)
            need.update(resolve(c).id for c in coefs if c is not None and not _is_literal(c))
            hp_read.update([i] if "hp" in what else [])
            h_read.update([i] if "h" in what else [])

        epilogue = bool(sp.updates and (sp.outputs or sp.readouts))
        epi_bwd: list[str] = []
        extra = self._epilogue_backward(epi_bwd, need) if epilogue else {}
        tail = self._adjoint_tail(local, need)
        epi_fwd: list[str] = []
        if epilogue:
            self._epilogue_forward(epi_fwd, self._upd, need)
        h_read |= {i for i, u in enumerate(sp.updates) if u.id in need}
        pro_roots = [r for r in self.region.nodes if r.id in need]
        need |= self.region.reads_of(pro_roots)
        # step t+1: its transition c_{t+1} (what lambda_{t+1} is carried back by) reads its
        # coefficients, and h_t as its previous state, h_{t+1} as its new one
        c_reads = LOCAL_READS[sp.kind][0]
        next_roots = self._coef_nodes(A="A" in c_reads, b="B" in c_reads)
        next_leaves = {x.id for x in self.region.leaves_of(next_roots)}
        if "hp" in c_reads:
            h_read |= set(range(k))
        hn_read = "h" in c_reads
        leaves_t = {x.id for x in self.leaves if x.id in need}
        self._head(lines, leaves_t | next_leaves, {x.id for x in self.rleaves if x.id in need})
        for i in range(k):
            lines.append(f"    lam{i} = tl.load(dhfin + (b * C + c) * {k} + {i}, mask=cmask, other=0.0).to(ACC)")
            if i in hp_read:
                lines.append(f"    hz{i} = tl.load(hinit + (b * C + c) * {k} + {i}, mask=cmask, other=0.0).to(ACC)")
            # an empty (packed) sequence: its final state is its initial state, so the adjoint passes through
            lines.append(f"    g0_{i} = tl.where(Tn == 0, lam{i}, tl.zeros([BLOCK_C], dtype=ACC))")
        self._invariant_loads(lines, leaves_t | next_leaves)
        lines += self._loop_head(next_t=hn_read or any(x not in self.invariant for x in next_leaves),
                                 prev_t=bool(hp_read))
        sidx = lambda tv, i: f"((bb * T + {tv}[:, None]) * C + c[None, :]) * {k} + {i}"  # noqa: E731
        self._loads(lines, "tmn", "mn", "_n", only=next_leaves)
        names_n = {kk: v + "_n" for kk, v in self.leaf_names.items()}
        for ln in self.region.forward_lines(next_roots, names_n, self.notes, "_n"):
            lines.append("        " + ln)
        for i in sorted(h_read):
            lines.append(f"        h{i} = tl.load(hseq + {sidx('tm', i)}, mask=m, other=0.0).to(ACC)")
        if hn_read:
            for i in range(k):
                lines.append(f"        hn{i} = tl.load(hseq + {sidx('tmn', i)}, mask=mn, other=0.0).to(ACC)")
        A_n, B_n = self._entries("_n")
        cn, _, _ = self._local(sp.kind, k, A_n, B_n, [f"h{i}" for i in range(k)], [f"hn{i}" for i in range(k)])
        if sp.kind == "block":  # lambda_t = dh_t + A_{t+1}^T lambda_{t+1}: scan the transposes
            mats = [f"tl.where(mn, {cn[j * k + i]}, {'1.0' if i == j else '0.0'}).to(ACC)"
                    for i in range(k) for j in range(k)]
        else:
            mats = [f"tl.where(mn, {cn[0]}, 1.0).to(ACC)"]
        for i, e in enumerate(mats):
            lines.append(f"        e{i} = {e}")
        # step t: leaves and the coefficients' values its reverse mode reads, the epilogue's
        self._loads(lines, "tm", "m", only=leaves_t)
        self._prologue(lines, roots=pro_roots)
        if sp.readouts:
            lines.append("        mo = (t < Tn)[:, None] & omask[None, :]")
        lines += epi_fwd + epi_bwd
        for i in range(k):
            more = "".join(f" + {e}" for e in extra.get(i, []))
            lines += ["        if HAS_DSEQ:",
                      f"            f{i} = tl.load(dhseq + {sidx('tm', i)}, mask=m, other=0.0).to(ACC)",
                      "        else:",
                      f"            f{i} = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)"]
            if more:
                lines.append(f"        f{i} = tl.where(m, f{i}{more}, 0.0)  # + the epilogue's adjoint of h_t")
        ea = [f"e{i}" for i in range(len(mats))]
        fb = [f"f{i}" for i in range(k)]
        sa = [f"sa{i}" for i in range(len(mats))]
        sb = [f"sb{i}" for i in range(k)]
        lines.append(f"        {', '.join(sa + sb)} = tl.associative_scan(({', '.join(ea + fb)},), 0, "
                     f"{_combine_name('diag' if k == 1 else 'block', k)})")
        lam = self._apply(k, "diag" if k == 1 else "block", sa, sb, [f"lam{i}" for i in range(k)])
        for i in range(k):
            lines.append(f"        lt{i} = {lam[i]}  # adjoint of h_t")
        for i in sorted(hp_read):
            lines.append(f"        hp{i} = tl.where(t[:, None] == 0, hz{i}[None, :], "
                         f"tl.load(hseq + {sidx('tmp', i)}, mask=m & (t[:, None] > 0), other=0.0).to(ACC))")
        lines += tail
        for j in range(k):
            lines.append(f"    tl.store(dh0 + (b * C + c) * {k} + {j}, g0_{j}, mask=cmask)")
        return "\n".join(lines) + "\n"

    def _loop_head(self, next_t: bool, prev_t: bool) -> list[str]:
        """The reverse loop over chunks and its steps t, with the memory positions of t, and
        of t + 1 (`next_t`) and t - 1 (`prev_t`) where something is loaded there."""
        out = ["    n_chunks = tl.cdiv(Tn, BLOCK_T)",
               "    for r in range(0, n_chunks):",
               "        t = (n_chunks - 1 - r) * BLOCK_T + (BLOCK_T - 1 - rows)  # rows in reverse time",
               "        m = (t < Tn)[:, None] & cmask[None, :]",
               "        tn = t + 1",
               "        mn = (tn < Tn)[:, None] & cmask[None, :]",
               "        tm = bos + t  # memory positions of step t" + (", t + 1" if next_t else "")
               + (", t - 1" if prev_t else "")]
        out += ["        tmn = bos + tn"] if next_t else []
        out += ["        tmp = bos + tl.maximum(t - 1, 0)"] if prev_t else []
        out += ["        if REVERSE:",
                "            tm = bos + Tn - 1 - t"]
        out += ["            tmn = bos + Tn - 1 - tn"] if next_t else []
        out += ["            tmp = bos + Tn - 1 - tl.maximum(t - 1, 0)"] if prev_t else []
        return out

    def _adjoint_tail(self, local, need: set) -> list[str]:
        """Step t after the adjoint scan: the local derivatives seed the prologue's reverse
        mode, which gives each leaf's gradient (stored); the initial state's gradient; the
        carry. `local(reads, i)` records what a local derivative reads, `need` what the
        prologue's reverse mode reads."""
        sp, k = self.spec, self.spec.k
        lines: list[str] = []
        A, B = self._entries()
        hp = [f"hp{i}" for i in range(k)]
        cl, da, db = self._local(sp.kind, k, A, B, hp, [f"h{i}" for i in range(k)])
        _, da_reads, db_reads = LOCAL_READS[sp.kind]
        seeds: dict[int, list[str]] = {}
        for idx, node in enumerate(self._coef_nodes(b=False)):
            if node is None or _is_literal(node):
                continue
            i, j = divmod(idx, k)
            if sp.kind == "block":
                seeds.setdefault(resolve(node).id, []).append(f"lt{i} * {hp[j]}")
                local({"hp"}, j)
            else:
                seeds.setdefault(resolve(node).id, []).append(f"lt0 * {da[0]}")
                local(da_reads, 0)
        for i, node in enumerate(sp.b):
            if node is not None and not _is_literal(node):
                seeds.setdefault(resolve(node).id, []).append(f"lt{i} * {db[i]}")
                local(db_reads, i)
        seed_names = {}
        for i, (nid, parts) in enumerate(seeds.items()):
            lines.append(f"        s{i} = tl.where(m, {' + '.join(parts)}, 0.0)")
            seed_names[nid] = f"s{i}"
        pro = {x.id for x in self.region.leaves}
        epi = {x.id for x in self.epi.leaves} if (sp.outputs or sp.readouts) else set()
        grad_names = {x.id: f"gx{i}" for i, x in enumerate(self.leaves) if x.id in pro}
        for ln in self.region.backward_lines(seed_names, self.leaf_names, self.notes, grad_names, need):
            lines.append("        " + ln)
        for i, x in enumerate(self.leaves):
            parts = ([f"gx{i}"] if x.id in pro else []) + ([f"ge{i}"] if x.id in epi else [])
            lines.append(f"        tl.store(d{i} + (bb * T + tm[:, None]) * C + c[None, :], "
                         f"{' + '.join(parts) or '0.0'} + tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC), mask=m)")
        # gradient of the initial state: dh_0/dh_{-1} applied to lambda_0 (the row t == 0)
        for j in range(k):
            if sp.kind == "block":
                terms = " + ".join(f"{cl[i * k + j]} * lt{i}" for i in range(k))
            else:
                terms = f"{cl[0]} * lt0"
            local(LOCAL_READS[sp.kind][0], j)
            lines.append(f"        g0_{j} += tl.sum(tl.where((t[:, None] == 0) & m, {terms}, 0.0), 0)")
        for i in range(k):  # carry: lambda at the chunk's earliest step (its last row)
            lines.append(f"        lam{i} = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, lt{i}, 0.0), 0)")
        return lines


# What the local derivatives of each scan kind (ScanKernel._local) read, per result (c, da,
# db): "A" the step's coefficients, "B" its inputs, "hp" the previous state, "h" the new one.
# A backward loads and recomputes only what the results it uses read.
LOCAL_READS = {
    "diag": ({"A"}, {"hp"}, set()),
    "maxplus": ({"A", "B", "hp"}, {"A", "B", "hp"}, {"A", "B", "hp"}),
    "lse": ({"A", "hp", "h"}, {"A", "hp", "h"}, {"B", "h"}),
    "block": ({"A"}, set(), set()),
}


def _time_invariant(ref) -> bool:
    return not any(x.op in (Op.INPUT, Op.STATE) for x in toposort([ref.node]))


def _is_literal(n: Node) -> bool:
    return literal(n) is not None
