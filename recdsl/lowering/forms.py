"""Lowering forms: what a stage computes, in the shape a kernel takes.

Backend-neutral dataclasses, one per lowering. A form holds exactly the IR nodes its
kernel reads (decays, keys, values, readout queries), already derived from the stage's
update by a matcher (match.py); a kernel of any backend can run it without looking at
the update again. `Rejection` is a form a matcher could not build, with the reason and
the .rec line of the construct that stopped it.

Adding a lowering: a new dataclass here (or in its own module), a matcher that builds it,
and one registry line per backend that implements it (see the README's architecture)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..ir import Node


@dataclass(frozen=True)
class Readout:
    """An output `q @ S'` (inclusive) or `q @ S` (exclusive) fused into the stage's kernel;
    `S' @ q` reads the transposed state. `extra`: a state-free term the output adds
    (`r @ (S + Y)` = the readout `r @ S` plus `r @ Y`, RWKV-6's bonus)."""
    node: Node        # the node whose value the kernel (plus extra) produces
    q: Node
    inclusive: bool
    transposed: bool = False
    extra: Node | None = None


@dataclass(frozen=True)
class Form:
    title: ClassVar[str] = "form"
    stage: int
    states: tuple[str, ...]

    def summary(self) -> str:
        """One line: the form and its main operands (what `recdsl check` prints)."""
        return self.title


@dataclass(frozen=True)
class Rejection:
    """A form that does not apply to the stage, and why (naming the construct and line)."""
    title: str
    reason: str
    line: int | None = None

    def summary(self) -> str:
        return f"{self.title}: {self.reason}" + (f" (line {self.line})" if self.line else "")


@dataclass(frozen=True)
class Vectorised(Form):
    """No recurrence: computed for all steps at once."""
    title: ClassVar[str] = "vectorised over all steps"


@dataclass(frozen=True)
class ElementScan(Form):
    """h_t = a_t * h_{t-1} + b_t per element (semiring `affine`), or max(h + a, b) /
    logaddexp(h + a, b). `log_a` set: the decay is exp(log_a), exponentiated in the scan."""
    title: ClassVar[str] = "element scan"
    semiring: str            # affine | max-plus | log-sum-exp
    a: Node | None           # None: identity decay (affine) / required for semirings
    b: Node | None
    log_a: Node | None = None
    flattened: bool = False  # a matrix state scanned element by element

    @property
    def kind(self) -> str:
        """The scan kernels' name for this semiring: diag | diagexp | maxplus | lse."""
        if self.semiring == "max-plus":
            return "maxplus"
        if self.semiring == "log-sum-exp":
            return "lse"
        return "diagexp" if self.log_a is not None and self.a is not None else "diag"

    def summary(self) -> str:
        how = {"diag": "", "diagexp": ", decay in log space"}.get(self.kind, f", {self.semiring}")
        return self.title + how + (", matrix state flattened" if self.flattened else "")


@dataclass(frozen=True)
class DenseSemiringScan(Form):
    """h_t[i] = (+)_j (h_{t-1}[j] (x) A_t[j, i]) (x) b_t[i] in the log semiring ((+) =
    logsumexp, (x) = +: the HMM forward algorithm) or the tropical one ((+) = max: Viterbi).
    `A` is the transition in (from j, to i) layout, [N, N] or broadcastable to it (a param,
    a per-step input, anything free of h); `b` [N] or None. The step is the semiring
    matrix-vector product h_t = h_{t-1} (x) M_t with M_t = A_t + b_t[None, :].
    `products`: a parallel (log-depth) scan of the [N, N] semiring matrix products (N^3 work
    a step: for small N); else the sequential semiring matrix-vector loop (N^2 a step)."""
    title: ClassVar[str] = "dense semiring scan"
    semiring: str            # max-plus | log-sum-exp
    A: Node
    b: Node | None
    n: int                   # N, the state's size
    products: bool

    @property
    def kind(self) -> str:
        """The kernels' name for this semiring: maxplus | lse."""
        return "maxplus" if self.semiring == "max-plus" else "lse"

    def summary(self) -> str:
        how = ("parallel scan of semiring matrix products" if self.products
               else "sequential semiring matrix-vector loop")
        return f"{self.title}, {self.semiring}, [{self.n}, {self.n}] transition, {how}"


@dataclass(frozen=True)
class BlockScan(Form):
    """k coupled states with elementwise coefficients: a k x k block per element."""
    title: ClassVar[str] = "block scan"
    A: dict = field(hash=False, compare=False)      # (i, j) -> Node
    b: dict = field(hash=False, compare=False)      # state -> Node | None

    def summary(self) -> str:
        return f"{self.title}, {len(self.states)}x{len(self.states)} blocks"


@dataclass(frozen=True)
class ChunkDiag(Form):
    """S_t = diag(d_t) S_{t-1} + k_t v_t^T, d a scalar or per-key decay, read out as q @ S.
    `log_decay`: log d (d proven positive). `signed`: d's sign is not known, the kernel
    carries log|d| and the running sign (a zero or negative decay stays exact)."""
    title: ClassVar[str] = "chunkwise diagonal decay"
    k: Node
    v: Node
    decay: Node | None               # the decay as written (None: identity)
    log_decay: Node | None           # log d, [] or [K] (None with decay None: identity)
    signed: bool
    readouts: tuple[Readout, ...]
    transposed: bool = False         # the state is [V, K] as written (decay on its value axis, read S' @ q)

    def summary(self) -> str:
        if self.decay is None:
            how = "no decay"
        elif self.signed:
            how = "signed decay (log|d| and its sign)"
        else:
            how = "decay in log space"
        scope = "" if self.decay is None else (", scalar" if self.decay.rank == 0 else ", per key")
        return (f"{self.title}, {how}{scope}, {len(self.readouts)} fused readout(s)"
                + (", state transposed" if self.transposed else ""))


@dataclass(frozen=True)
class ChunkDelta(Form):
    """The (gated) delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    read out as q @ S' (WY/UT form, MATH.md §4)."""
    title: ClassVar[str] = "chunkwise delta rule (WY/UT)"
    k: Node
    v: Node
    beta: Node
    log_decay: Node | None           # scalar, None: ungated
    readouts: tuple[Readout, ...]

    def summary(self) -> str:
        return self.title + (", gated" if self.log_decay is not None else "")


@dataclass(frozen=True)
class HouseholderProducts(Form):
    """n delta-rule steps per token (DeltaProduct): interleaved into one delta rule over
    T*n steps, read out after each token's last step."""
    title: ClassVar[str] = "Householder products (interleaved delta rule)"
    steps: tuple = field(hash=False, compare=False)   # ({k, v, beta}, ...) in order
    readouts: tuple[Readout, ...] = ()

    def summary(self) -> str:
        return f"{self.title}, {len(self.steps)} steps per token"


@dataclass(frozen=True)
class ChunkDPLR(Form):
    """Diagonal plus low rank: S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T, read
    out as q @ S' (KDA, RWKV-7: the delta rule with a per-key decay)."""
    title: ClassVar[str] = "chunkwise diagonal-plus-low-rank (generalised delta rule)"
    k: Node
    v: Node
    a: Node
    b: Node
    log_decay: Node
    readouts: tuple[Readout, ...]


@dataclass(frozen=True)
class SequentialLoop(Form):
    """The stage's step in a loop over time: every stage can run this way."""
    title: ClassVar[str] = "sequential loop"
    core: tuple = field(hash=False, compare=False)   # the nodes the loop computes each step

    def summary(self) -> str:
        return f"{self.title} over the recurrent core ({len(self.core)} nodes a step)"


@dataclass(frozen=True)
class NewtonSolve(Form):
    """A nonlinear stage h_t = f(h_{t-1}, x_t) solved for all t at once by Newton's method
    (DEER / ParaRNN, MATH.md §5): each iteration evaluates f and its Jacobian w.r.t. the
    stage's own states over all steps, then solves the linearised recurrence with a scan.
    `block`: 1 when the Jacobian is diagonal (one state, elementwise), k for k coupled states
    of one shape whose Jacobian is k x k per element (block-diagonal). `core`: the nodes the
    step computes (the same as the sequential loop's)."""
    title: ClassVar[str] = "parallel Newton"
    core: tuple = field(hash=False, compare=False)
    block: int = 1

    def summary(self) -> str:
        how = "diagonal Jacobian" if self.block == 1 else f"{self.block}x{self.block} Jacobian blocks"
        return f"{self.title} ({how}, linearised steps by a scan)"


@dataclass(frozen=True)
class Wavefront(Form):
    """A cell `over grid2d` (any update, nonlinear too) by anti-diagonals: every cell (x, y)
    with x + y = d at once, d = 0 .. X+Y-2, reading its left / up neighbours' new states
    from diagonal d-1 (the whole cell: all its stages in one sweep)."""
    title: ClassVar[str] = "wavefront over anti-diagonals"


@dataclass(frozen=True)
class LevelSync(Form):
    """A cell `over dag` level-synchronously: the nodes of one topological level at once,
    sum_in(...) an index_add over their in-edges (the whole cell: all its stages)."""
    title: ClassVar[str] = "level-synchronous over topological levels"
