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

    def _head(self, lines):
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
        if self.readout_mode and self.spec.rax == 2:   # lanes: BLOCK_C // NP outer rows x NP (the last axis, padded)
            lines += ["    CO = C // C2  # outer channels (one readout each)",
                      "    ro = pid_c * (BLOCK_C // NP) + tl.arange(0, BLOCK_C // NP)",
                      "    omask = ro < CO",
                      "    rol = pid_c * (BLOCK_C // NP) + lane // NP",
                      "    c2 = lane % NP",
                      "    cmask = (rol < CO) & (c2 < C2)",
                      "    c = rol * C2 + c2  # the channel in the [B, T, C] layout",
                      "    c1 = rol % C1",
                      "    c0 = rol // C1",
                      "    r2 = ro * 0",
                      "    r1 = ro % C1",
                      "    r0 = ro // C1"]
        elif self.readout_mode:   # the readout reduces the state's first axis (q @ S): lanes x NP of C1
            lines += ["    CO = C // C1  # outer channels (one readout each)",
                      "    ro = pid_c * (BLOCK_C // NP) + tl.arange(0, BLOCK_C // NP)",
                      "    omask = ro < CO",
                      "    rol = pid_c * (BLOCK_C // NP) + lane // NP",
                      "    c1 = lane % NP",
                      "    cmask = (rol < CO) & (c1 < C1)",
                      "    c2 = rol % C2",
                      "    c0 = rol // C2",
                      "    c = (c0 * C1 + c1) * C2 + c2  # the channel in the [B, T, C] layout",
                      "    r2 = ro % C2",
                      "    r1 = ro * 0",
                      "    r0 = ro // C2"]
        else:
            lines += ["    c = pid_c * BLOCK_C + lane",
                      "    cmask = c < C",
                      "    c0 = c // (C1 * C2)",
                      "    c1 = (c // C2) % C1",
                      "    c2 = c % C2"]
        for i in range(len(self.leaves)):
            lines.append(f"    l{i}_c = bb * l{i}_sb + c0 * l{i}_s0 + c1 * l{i}_s1 + c2 * l{i}_s2")
        for j in range(len(self.rleaves)):
            lines.append(f"    rl{j}_c = bb * rl{j}_sb + r0 * rl{j}_s0 + r1 * rl{j}_s1 + r2 * rl{j}_s2")

    def _invariant_loads(self, lines):
        for i, x in enumerate(self.leaves):
            if x.id in self.invariant:
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

    def _prologue(self, lines, suffix=""):
        names = {k: v + suffix for k, v in self.leaf_names.items()}
        roots = [a for row in self.spec.A for a in row] + list(self.spec.b)
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

    def _epilogue_forward(self, lines, upd_names: dict):
        """The outputs computed from the new states (named by upd_names) in registers."""
        sp = self.spec
        self._upd = upd_names
        roots = list(sp.outputs) + [q for _, _, q in sp.readouts]
        for ln in self.epi.forward_lines(roots, {**self.leaf_names, **upd_names}, self.notes):
            lines.append("        " + ln)
        if not sp.readouts:
            return
        for j, (r, si, q) in enumerate(sp.readouts):
            hname = upd_names[sp.updates[si].id]
            lines.append(annotate(f"        y{j} = tl.sum(tl.reshape(tl.where(m, {hname} * {self._epi_name(q)}, 0.0), "
                                  f"[BLOCK_T, BLOCK_C // NP, NP]), 2)  # fused readout: [BLOCK_T, BLOCK_C // NP]",
                                  self.notes(r)))
        lines.append("        mo = (t < Tn)[:, None] & omask[None, :]")
        for j, x in enumerate(self.rleaves):
            load = f"tl.load(rl{j} + rl{j}_c[None, :] + tm[:, None] * rl{j}_st, mask=mo, other=1.0)"
            val = f"{load} != 0" if x.is_bool else f"{load}.to(ACC)"
            lines.append(annotate(f"        rx{j} = {val}", self.notes(x, with_text=False)))
        for ln in self.red.forward_lines(list(sp.reduced), {**self.rleaf_names, **self.read_names}, self.notes):
            lines.append("        " + ln)

    def _epilogue_backward(self, lines) -> dict[int, list[str]]:
        """Reverse mode of the epilogue at step t (forward values recomputed from the saved
        h_t): stores the reduced leaves' gradients, accumulates the full leaves' into ge{i}
        and returns, per state index, the terms it adds to the adjoint of h_t."""
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
            for ln in self.red.backward_lines(seeds, {**self.rleaf_names, **self.read_names}, self.notes, names):
                lines.append("        " + ln)
            for j in range(len(self.rleaves)):
                lines.append(f"        tl.store(dr{j} + (bb * T + tm[:, None]) * CO + ro[None, :], grx{j}"
                             f" + tl.zeros([BLOCK_T, BLOCK_C // NP], dtype=ACC), mask=mo)")
            for j, (r, si, q) in enumerate(sp.readouts):
                lines.append(f"        gyb{j} = tl.reshape(tl.broadcast_to(gy{j}[:, :, None], "
                             f"[BLOCK_T, BLOCK_C // NP, NP]), [BLOCK_T, BLOCK_C])")
                add.setdefault(si, []).append(f"gyb{j} * {self._epi_name(q)}")
                grads_q.setdefault(resolve(q).id, []).append(f"gyb{j} * {self._upd[sp.updates[si].id]}")
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
        for ln in self.epi.backward_lines(seed_names, {**self.leaf_names, **self._upd}, self.notes, names):
            lines.append("        " + ln)
        for i in range(len(sp.updates)):
            add.setdefault(i, []).append(f"gu{i}")
        return add

    def _local(self, kind, k, A, B, hp, h):
        """(c, da, db): dh_t/dh_{t-1} per (i, j), and dh_t/da, dh_t/db per entry, as expressions
        of the step's coefficients, previous and new state."""
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
        sp, k = self.spec, self.spec.k
        lines = ["@triton.jit",
                 f"def {sp.name}_bwd({', '.join(self.arg_names(True))},",
                 "        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DSEQ: tl.constexpr,"
                 " VARLEN: tl.constexpr, REVERSE: tl.constexpr"
                 + (", NP: tl.constexpr):" if self.readout_mode else "):"),
                 f"    # adjoint of stage {', '.join(sp.states)}: reverse-time {sp.kind} scan, chunks last to first"]
        self._head(lines)
        for i in range(k):
            lines.append(f"    lam{i} = tl.load(dhfin + (b * C + c) * {k} + {i}, mask=cmask, other=0.0).to(ACC)")
            lines.append(f"    hz{i} = tl.load(hinit + (b * C + c) * {k} + {i}, mask=cmask, other=0.0).to(ACC)")
            # an empty (packed) sequence: its final state is its initial state, so the adjoint passes through
            lines.append(f"    g0_{i} = tl.where(Tn == 0, lam{i}, tl.zeros([BLOCK_C], dtype=ACC))")
        self._invariant_loads(lines)
        lines += ["    n_chunks = tl.cdiv(Tn, BLOCK_T)",
                  "    for r in range(0, n_chunks):",
                  "        t = (n_chunks - 1 - r) * BLOCK_T + (BLOCK_T - 1 - rows)  # rows in reverse time",
                  "        m = (t < Tn)[:, None] & cmask[None, :]",
                  "        tn = t + 1",
                  "        mn = (tn < Tn)[:, None] & cmask[None, :]",
                  "        tm = bos + t  # memory positions of steps t, t + 1, t - 1",
                  "        tmn = bos + tn",
                  "        tmp = bos + tl.maximum(t - 1, 0)",
                  "        if REVERSE:",
                  "            tm = bos + Tn - 1 - t",
                  "            tmn = bos + Tn - 1 - tn",
                  "            tmp = bos + Tn - 1 - tl.maximum(t - 1, 0)"]
        sidx = lambda tv, i: f"((bb * T + {tv}[:, None]) * C + c[None, :]) * {k} + {i}"  # noqa: E731
        # step t+1: its transition c_{t+1} (identity past the end)
        A_n, B_n = self._entries("_n")
        needs_next = sp.kind in ("maxplus", "lse")
        roots_next = [a for row in sp.A for a in row] + (list(sp.b) if needs_next else [])
        need_ids = {x.id for x in self.region.leaves_of(roots_next)}
        self._loads(lines, "tmn", "mn", "_n", only=need_ids)
        names_n = {kk: v + "_n" for kk, v in self.leaf_names.items()}
        for ln in self.region.forward_lines(roots_next, names_n, self.notes, "_n"):
            lines.append("        " + ln)
        for i in range(k):
            lines.append(f"        h{i} = tl.load(hseq + {sidx('tm', i)}, mask=m, other=0.0).to(ACC)")
        if needs_next:
            for i in range(k):
                lines.append(f"        hn{i} = tl.load(hseq + {sidx('tmn', i)}, mask=mn, other=0.0).to(ACC)")
        cn, _, _ = self._local(sp.kind, k, A_n, B_n, [f"h{i}" for i in range(k)], [f"hn{i}" for i in range(k)])
        if sp.kind == "block":  # lambda_t = dh_t + A_{t+1}^T lambda_{t+1}: scan the transposes
            mats = [f"tl.where(mn, {cn[j * k + i]}, {'1.0' if i == j else '0.0'}).to(ACC)"
                    for i in range(k) for j in range(k)]
        else:
            mats = [f"tl.where(mn, {cn[0]}, 1.0).to(ACC)"]
        for i, e in enumerate(mats):
            lines.append(f"        e{i} = {e}")
        # step t: leaves and coefficients (for the local derivatives below and the epilogue)
        self._loads(lines, "tm", "m")
        self._prologue(lines)
        extra = {}
        if sp.updates and (sp.outputs or sp.readouts):
            if sp.readouts:
                lines.append("        mo = (t < Tn)[:, None] & omask[None, :]")
            self._epilogue_forward(lines, {u.id: f"h{i}" for i, u in enumerate(sp.updates)})
            extra = self._epilogue_backward(lines)
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
        # step t: local derivatives, seeds of the prologue's reverse mode
        A, B = self._entries()
        for i in range(k):
            lines.append(f"        hp{i} = tl.where(t[:, None] == 0, hz{i}[None, :], "
                         f"tl.load(hseq + {sidx('tmp', i)}, mask=m & (t[:, None] > 0), other=0.0).to(ACC))")
        hp = [f"hp{i}" for i in range(k)]
        cl, da, db = self._local(sp.kind, k, A, B, hp, [f"h{i}" for i in range(k)])
        seeds: dict[int, str] = {}
        coef_nodes = [a for row in sp.A for a in row]
        for idx, node in enumerate(coef_nodes):
            if node is None or _is_literal(node):
                continue
            i, j = divmod(idx, k)
            g = f"lt{i} * {hp[j]}" if sp.kind == "block" else f"lt0 * {da[0]}"
            seeds.setdefault(resolve(node).id, []).append(g)
        for i, node in enumerate(sp.b):
            if node is not None and not _is_literal(node):
                seeds.setdefault(resolve(node).id, []).append(f"lt{i} * {db[i]}")
        seed_names = {}
        for i, (nid, parts) in enumerate(seeds.items()):
            lines.append(f"        s{i} = tl.where(m, {' + '.join(parts)}, 0.0)")
            seed_names[nid] = f"s{i}"
        pro = {x.id for x in self.region.leaves}
        epi = {x.id for x in self.epi.leaves} if (sp.outputs or sp.readouts) else set()
        grad_names = {x.id: f"gx{i}" for i, x in enumerate(self.leaves) if x.id in pro}
        for ln in self.region.backward_lines(seed_names, self.leaf_names, self.notes, grad_names):
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
            lines.append(f"        g0_{j} += tl.sum(tl.where((t[:, None] == 0) & m, {terms}, 0.0), 0)")
        for i in range(k):  # carry: lambda at the chunk's earliest step (its last row)
            lines.append(f"        lam{i} = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, lt{i}, 0.0), 0)")
        for j in range(k):
            lines.append(f"    tl.store(dh0 + (b * C + c) * {k} + {j}, g0_{j}, mask=cmask)")
        return "\n".join(lines) + "\n"


def _time_invariant(ref) -> bool:
    return not any(x.op in (Op.INPUT, Op.STATE) for x in toposort([ref.node]))


def _is_literal(n: Node) -> bool:
    return literal(n) is not None
