"""Sequential stages without op dispatch: the whole time loop of an eligible stage runs in
ONE generated C call. Per step it computes the recurrent GEMMs (W @ h for params W, with a
small register-blocked kernel over weights packed once per call) and then everything
elementwise (the gates), reading the hoisted inputs in place and writing the new states
straight into the output sequences. This is what makes an LSTM competitive with
torch.nn.LSTM on CPU: a torch GEMM call per step (plus a call for the gates) costs about
as much again as oneDNN's whole LSTM.

Inference only (no autograd): with gradients the backend runs the torch loop.

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
import hashlib
import subprocess
import warnings
from pathlib import Path

import torch

from recdsl.ir import BINARY, COMPARE, IRCell, Node, Op

from . import cpu_kernels, kcache

C_UNARY = {
    Op.NEG: "(-{0})", Op.EXP: "EXP({0})", Op.LOG: "LOG({0})", Op.LOG1P: "LOG1P({0})", Op.EXPM1: "EXPM1({0})",
    Op.SIGMOID: "(ONE / (ONE + EXP(-({0}))))", Op.TANH: "TANH({0})", Op.ABS: "FABS({0})",
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
    gemms = [n for n in core if n.op == Op.MATMUL and n.srcs[0].op == Op.PARAM and n.srcs[0].rank == 2
             and n.srcs[1].rank == 1]
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


class _Gen:
    """C code for the stage's time loop; the region runs one lane (element i of the states) at a time."""

    def __init__(self, ir, states, gemms, leaves):
        self.ir, self.states = ir, states
        self.H = ir.shape_of(ir.states[states[0]])[0]
        self.gemm = {g.id: k for k, g in enumerate(gemms)}
        self.gemm_len = [ir.shape_of(g)[0] for g in gemms]
        self.gemm_src = [states.index(g.srcs[1].arg[0]) for g in gemms]   # the state each GEMM reads
        params = [n for n in leaves if n.op == Op.PARAM]
        seqs = [n for n in leaves if n.op != Op.PARAM]
        self.leaf = {n.id: k for k, n in enumerate(params)} | {n.id: k for k, n in enumerate(seqs)}
        self.kinds = {n.id: ("param" if n.op == Op.PARAM else "seq") for n in leaves}
        self.memo: dict = {}
        self.lines: list[str] = []
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
        where = self.notes(n, with_text=False)
        self.lines.append(f"        T_ {name} = {expr};" + (f"  /* {where} */" if where else ""))
        return name

    def source(self, updates: list[Node], nparams: int, nseq: int) -> str:
        ns, ng = len(updates), len(self.gemm_len)
        outs = [self.val(u, 0) for u in updates]
        sig = ", ".join([f"T_* st{k}_0, T_* st{k}_1, T_* out_{k}, int64_t osb_{k}, int64_t ost_{k}" for k in range(ns)]
                        + [f"T_* gm_{k}, const T_* wp_{k}, int64_t wh_{k}" for k in range(ng)]
                        + [f"const void* pp_{k}" for k in range(nparams)]
                        + [f"view_t in_{k}" for k in range(nseq)]
                        + ["int64_t T", "int64_t B", "int64_t NH", "int64_t nthreads"])
        body = "\n".join(self.lines)
        stores = "\n".join(f"          row_out_{k}[i] = {v}; row_next_{k}[i] = {v};" for k, v in enumerate(outs))
        rows = "\n".join(
            [f"        const T_* restrict row_prev_{k} = cur_{k} + bh * H;" for k in range(ns)]
            + [f"        T_* restrict row_out_{k} = out_{k} + b * osb_{k} + t * ost_{k} + hd * H;" for k in range(ns)]
            + [f"        T_* restrict row_next_{k} = nxt_{k} + bh * H;" for k in range(ns)]
            + [f"        const T_* restrict row_gm_{k} = gm_{k} + bh * {self.gemm_len[k]};" for k in range(ng)]
            + [f"        const T_* restrict row_in_{k} = (const T_*)in_{k}.p + b * in_{k}.sb + hd * in_{k}.sh"
               f" + t * in_{k}.st;" for k in range(nseq)])
        # W @ state for W [L, H] shared by the heads (rows: B * NH states) or [NH, L, H] (rows:
        # the B states of each head), one packed panel of NR outputs per work item
        gemms = "\n".join(
            f"""      {{
        const int64_t L = {L}, np = (L + NR_SFX - 1) / NR_SFX, shared = wh_{k} == 1;
        #pragma omp for schedule(static) nowait
        for (int64_t it = 0; it < wh_{k} * np; it++) {{
          int64_t hd = it / np, p = it % np, nc = L - p * NR_SFX < NR_SFX ? L - p * NR_SFX : NR_SFX;
          panel_SFX(cur_{j} + hd * H, shared ? H : NH * H, shared ? B * NH : B, H, wp_{k} + it * H * NR_SFX,
                    gm_{k} + hd * L + p * NR_SFX, shared ? L : NH * L, nc);
        }}
      }}""" for k, (L, j) in enumerate(zip(self.gemm_len, self.gemm_src)))
        init = " ".join(f"T_* cur_{k} = st{k}_0; T_* nxt_{k} = st{k}_1;" for k in range(ns))
        swap = " ".join(f"{{ T_* tmp = cur_{k}; cur_{k} = nxt_{k}; nxt_{k} = tmp; }}" for k in range(ns))
        # The whole time loop in one call, in one parallel region: per step the threads split
        # the GEMMs' output panels, meet at a barrier, split the (batch, head) rows of the
        # elementwise step, meet again (the next GEMMs read every lane of the new states).
        fn = f"""
void loop_SFX({sig}) {{
  const int64_t H = {self.H};
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {{
    {init}
    for (int64_t t = 0; t < T; t++) {{
{gemms}
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
        f32 = (GEMM + fn).replace("SFX", "f32").replace("T_", "float")
        f64 = (GEMM + fn).replace("SFX", "f64").replace("T_", "double")
        macros32 = ("#define EXP vexpf\n#define LOG logf\n#define LOG1P log1pf\n#define EXPM1 expm1f\n#define TANH vtanhf\n"
                    "#define FABS fabsf\n#define SQRT sqrtf\n#define SIN sinf\n#define COS cosf\n#define POW powf\n"
                    "#define ERF erff\n#define ONE 1.0f\n")
        macros64 = ("#define EXP exp\n#define LOG log\n#define LOG1P log1p\n#define EXPM1 expm1\n#define TANH tanh\n"
                    "#define FABS fabs\n#define SQRT sqrt\n#define SIN sin\n#define COS cos\n#define POW pow\n"
                    "#define ERF erf\n#define ONE 1.0\n")
        undef = "".join(f"#undef {m}\n" for m in ("EXP", "LOG", "LOG1P", "EXPM1", "TANH", "FABS", "SQRT", "SIN", "COS",
                                                 "POW", "ERF", "ONE"))
        lae32 = "static inline float LAE_f(float a, float b) { float m = a > b ? a : b; " \
                "return isinf(m) && m < 0 ? m : m + log1pf(expf(-(a > b ? a - b : b - a))); }\n"
        lae64 = "static inline double LAE_d(double a, double b) { double m = a > b ? a : b; " \
                "return isinf(m) && m < 0 ? m : m + log1p(exp(-(a > b ? a - b : b - a))); }\n"
        # vmath.h: vexpf / vtanhf, which vectorise across lanes (libm's are scalar calls, and
        # the gates of a 4096-lane step would cost more than the step's GEMM)
        return ('#include "vmath.h"\n'
                "typedef struct { const void* p; int64_t sb, sh, st, sf; } view_t;\n" + lae32 + lae64
                + macros32 + "#define LAE LAE_f\n" + f32 + undef + "#undef LAE\n"
                + macros64 + "#define LAE LAE_d\n" + f64)


# The recurrent GEMM: c[r, 0:nc] = a[r, :] @ wp for one panel wp [K][NR] of the weight packed
# K-major (NR: one 32-byte vector of outputs), 8 rows at a time with the accumulators in
# registers (one weight load feeds 8 FMAs). Per step the weights (1 MiB for an LSTM with
# H=256) stream from L2 while the states stay in L1; this runs the [16, 256] x [256, 1024]
# step GEMM twice as fast as a torch (MKL) call per step. Measured on AVX2 (2 cores): 8x1
# vectors beat 4x2, 2x4 and 3x3 blocks by 10-20%.
GEMM = """
#define NR_SFX ((int64_t)(32 / sizeof(T_)))
typedef T_ vec_SFX __attribute__((vector_size(32)));
typedef T_ uvec_SFX __attribute__((vector_size(32), aligned(sizeof(T_))));  /* unaligned rows of c */

static inline void store_SFX(T_* c, vec_SFX v, int64_t nc) {
  if (nc == NR_SFX) *(uvec_SFX*)c = v;
  else memcpy(c, &v, nc * sizeof(T_));
}

/* mr (a constant after inlining) rows */
static inline __attribute__((always_inline)) void rows_SFX(int mr, const T_* restrict a, int64_t lda, int64_t K,
                                                          const T_* restrict wp, T_* restrict c, int64_t ldc, int64_t nc) {
  vec_SFX acc[8];
  for (int i = 0; i < mr; i++) acc[i] = (vec_SFX){0};
  for (int64_t k = 0; k < K; k++) {
    vec_SFX w = *(const vec_SFX*)(wp + k * NR_SFX);
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++) acc[i] += a[i * lda + k] * w;
  }
  for (int i = 0; i < mr; i++) store_SFX(c + i * ldc, acc[i], nc);
}

/* one row (B = 1, or the rows left over): four accumulators over k hide the FMA latency */
static void row1_SFX(const T_* restrict a, int64_t K, const T_* restrict wp, T_* restrict c, int64_t nc) {
  vec_SFX acc[4] = {{0}, {0}, {0}, {0}};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int j = 0; j < 4; j++) acc[j] += a[k + j] * *(const vec_SFX*)(wp + (k + j) * NR_SFX);
  for (; k < K; k++) acc[0] += a[k] * *(const vec_SFX*)(wp + k * NR_SFX);
  store_SFX(c, (acc[0] + acc[1]) + (acc[2] + acc[3]), nc);
}

static void panel_SFX(const T_* restrict a, int64_t lda, int64_t m, int64_t K, const T_* restrict wp,
                      T_* restrict c, int64_t ldc, int64_t nc) {
  int64_t r = 0;
  for (; r + 8 <= m; r += 8) rows_SFX(8, a + r * lda, lda, K, wp, c + r * ldc, ldc, nc);
  if (r + 4 <= m) { rows_SFX(4, a + r * lda, lda, K, wp, c + r * ldc, ldc, nc); r += 4; }
  for (; r < m; r++) row1_SFX(a + r * lda, K, wp, c + r * ldc, nc);
}
"""


# -ffp-contract=fast: the GEMM's multiply-adds become FMAs (ISO C mode turns that off)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-ffp-contract=fast",
         "-shared", "-fPIC", "-std=c99"]


def _compile(src: str) -> ctypes.CDLL:
    """The stage's loop library, from the kernel cache (kcache.py) or built now; BuildError
    (or OSError) when it cannot be had."""
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
            raise kcache.BuildError(f"the generated step did not compile: {r.stderr[:300]}")

    return kcache.load_library(f"loop-{key}", build, ("loop_f32", "loop_f64"))


def usable(dtype, *tensors) -> bool:
    """The fused path runs without gradients, on CPU, in fp32/fp64, with a C compiler."""
    grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)
    return not grad and dtype in (torch.float32, torch.float64) and cpu_kernels._compiler() is not None \
        and all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))


def toolchain_missing() -> str | None:
    """Why no generated C loop can run in this process, or None: the scan library is the
    probe (same compiler, flags, OpenMP and cache directory), built once per machine."""
    if cpu_kernels._compiler() is None:
        return "no C compiler (cc/gcc/clang) found"
    why = cpu_kernels.unavailable_reason()
    return f"the C toolchain does not work here: {why}" if why else None


class FusedLoop:
    """The runner the generated forward calls for an eligible loop stage."""

    def __init__(self, ir: IRCell, states: list[str], core: list[Node]):
        self.gemms, region, self.leaves = plan_stage(ir, states, core)
        self.states = states
        self.params = [n for n in self.leaves if n.op == Op.PARAM]
        self.seqs = [n for n in self.leaves if n.op != Op.PARAM]
        gen = _Gen(ir, states, self.gemms, self.params + self.seqs)
        self.source = gen.source([ir.updates[s] for s in states], len(self.params), len(self.seqs))
        self.keep = set(states)   # states whose whole sequence the forward reads (codegen narrows it)
        # Decided here, where the kernel is selected (kernels._loop_explain) and emitted
        # (codegen._fused), so that the plan never promises a C loop this process cannot build.
        why = toolchain_missing()
        if why:
            raise NotEligible(why)
        self.lib = None
        self.error: str | None = None

    def usable(self, dtype, *tensors) -> bool:
        """`usable` for this loop, and its library loads (built on first use). A build that
        fails here (the generated C does not compile, the disk is full) warns once and the
        forward runs the per-step torch loop instead."""
        if not usable(dtype, *tensors) or self.error is not None:
            return False
        if self.lib is None:
            try:
                self.lib = _compile(self.source)
            except (kcache.BuildError, OSError) as e:
                self.error = str(e)
                warnings.warn(f"recdsl: the fused C loop of {', '.join(self.states)} could not be built "
                              f"({self.error}); running the per-step torch loop instead", kcache.CacheWarning,
                              stacklevel=2)
                return False
        return True

    def run(self, seq_values: list, P0: dict, S0: dict, X0, ns: int, dtype):
        """seq_values: whole-sequence tensors of self.seqs (prefix [B, T, (heads)]).
        Returns ({state: sequence [B, T, (heads), H]} for the states in self.keep, {state: final})."""
        if self.lib is None:
            self.lib = _compile(self.source)   # (the generated forward asked `usable` first)
        fn = getattr(self.lib, "loop_f32" if dtype == torch.float32 else "loop_f64")
        heads = ns == 3
        B, T = X0.shape[:2]
        NH = X0.shape[2] if heads else 1
        H = S0[self.states[0]].shape[-1]
        params = [P0[n.arg].to(dtype).contiguous() for n in self.params]
        views = []
        keep = []
        for x, node in zip(seq_values, self.seqs):
            x = x.to(dtype)
            while x.dim() < ns + 1:
                x = x.unsqueeze(-1)
            if not heads:
                x = x.unsqueeze(2)
            L = node.shape and int(x.shape[3]) or 1
            if node.rank == 1 and (x.shape[3] != L or x.stride(3) != 1):
                x = x.contiguous()  # the generated code reads the feature axis with stride 1
            keep.append(x)
            sb, st, sh, sf = x.stride()
            sb = sb if x.shape[0] > 1 else 0
            st = st if x.shape[1] > 1 else 0
            sh = sh if x.shape[2] > 1 else 0
            sf = sf if x.shape[3] > 1 else 0
            views.append(cpu_kernels.View(x.data_ptr(), sb, sh, st, sf))
        vp, c_int = ctypes.c_void_p, ctypes.c_int64
        # Per state: two contiguous [B * NH, H] buffers the loop swaps (a fresh copy of S0, which
        # is never written), and the output sequence; a state whose sequence nobody reads
        # writes its rows to one scratch row block (time stride 0) instead of T of them.
        args, bufs, outs = [], {}, {}
        for s in self.states:
            bufs[s] = torch.empty((2, B * NH, H), dtype=dtype)
            bufs[s][0].copy_(S0[s].to(dtype).expand((B, NH, H) if heads else (B, H)).reshape(B * NH, H))
            outs[s] = torch.empty((B, T, NH, H) if s in self.keep else (B, 1, NH, H), dtype=dtype)
            o = outs[s]
            args += [vp(bufs[s][0].data_ptr()), vp(bufs[s][1].data_ptr()), vp(o.data_ptr()),
                     c_int(o.stride(0)), c_int(o.stride(1) if s in self.keep else 0)]
        # Per GEMM: the weight packed into panels [heads, L / NR, H, NR] (zero-padded), one row
        # of outputs [B * NH, L] for the step.
        nr = 32 // torch.empty((), dtype=dtype).element_size()
        work = B * NH * H   # lanes plus multiply-adds per step
        for g in self.gemms:
            w = P0[g.srcs[0].arg].to(dtype)
            wh, L = (1, w.shape[0]) if w.dim() == 2 else w.shape[:2]
            npan = -(-L // nr)
            w = torch.nn.functional.pad(w.reshape(wh, L, H), (0, 0, 0, npan * nr - L))
            packed = w.view(wh, npan, nr, H).transpose(2, 3).contiguous()
            gm = torch.empty((B * NH, L), dtype=dtype)
            keep += [packed, gm]
            args += [vp(gm.data_ptr()), vp(packed.data_ptr()), c_int(wh)]
            work += B * NH * L * H
        # threads only when a step has enough work to pay for its two barriers
        nthreads = torch.get_num_threads() if work >= 1 << 16 else 1
        fn(*args, *[vp(p.data_ptr()) for p in params], *views, c_int(T), c_int(B), c_int(NH), c_int(nthreads))
        del keep
        shape = (B, NH, H) if heads else (B, H)
        finals = {s: bufs[s][T % 2].view(shape) for s in self.states}
        seqs = {s: (outs[s] if heads else outs[s][:, :, 0]) for s in self.states if s in self.keep}
        return seqs, finals
