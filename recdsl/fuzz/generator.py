"""Random well-typed cells, as .rec source text.

A cell is put together from *motifs*, each one recurrence of a known shape with random
parts: a gated vector recurrence, a matrix state fed by outer products (read out as
`q @ S'`, `q @ S` or `sum(S' * q[:, None], axis=0)`), a max-plus / log-sum-exp stabiliser
with exp-stabilised followers (mLSTM-like), 2x2 rotation blocks (LRU-like), the delta rule
(ungated, gated, decay-first, KDA-like, RWKV-7-like, `outer(k, v - k @ S)`), Householder
products (DeltaProduct: 2 or 3 delta steps per token, in a `for` loop, unrolled or nested),
a dense contraction `A @ h`, and nonlinear cells (Elman, IndRNN, LSTM/GRU-like, with
`concat`/`split` and per-step scalar inputs), plus states that read no state at all
(hoisted). Later motifs may read earlier states (multi-stage cells, "given m"); the free
parts (gates, values, keys) are random expressions of inputs, params and earlier states.

Decays are written in every spelling the analysis and the backends' matchers tell apart
(`decay`): a constant (0.9), a hyper-parameter (`cell X(K, gamma1=0.9)`), a raw param
(`param p[] = 0.9`, `param p[K] = 0.95`), `exp(-softplus(x))`, `exp(.)` of a non-positive
expression, `sigmoid(x)`, `1 - sigmoid(x)`, `sigmoid(x) ** (1/c)`, `0.5 + 0.5 * sigmoid(x)`,
a product of two gates, a signed decay (`tanh(x)`, `0.9 * tanh(x)`, `cos(x)`); scalar or
vector; on matrix states scalar, per key (`g[:, None]`) or per value (`g[None, :]`).

Numerically tame by construction: every decay has magnitude <= 1 (most are in (0, 1)),
dense transitions are contractions (|A| row sums < 1), keys of delta rules are
l2-normalised with strengths sigmoid(.) in (0, 1), values are tanh'd or small, so that a
disagreement between backends is a real one and not round-off amplified by an exploding
recurrence.

`generate(rng)` returns the source text of one cell; `generate_tagged(rng)` also the
tags (`TAGS`) of the motifs and spellings it used. Every generated cell parses and checks
(a cell that does not is a bug of this generator, tested in tests/fuzz)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

Shape = tuple  # of dim names (str), e.g. ("K", "V"); () is a scalar

# Dims a cell may use: D for input widths, the others for states.
STATE_DIMS = ("H", "N", "K", "V")

# ---- spelling tags ------------------------------------------------------------------
# Decay spellings (`decay`); each is tagged per kind of state it decays:
#   vec.decay.X   a vector state,   mat.decay.X   a matrix state fed by outer products,
#   delta.decay.X the decay of a delta rule (gated, decay-first, KDA-like, RWKV-7-like).
DECAY_SPELLINGS = ("const", "hyper", "param", "param_vec", "exp_neg_softplus", "exp_nonpos", "sigmoid",
                   "one_minus_sigmoid", "sigmoid_pow", "affine_sigmoid", "product", "signed")
SCALAR_ONLY = ("const", "hyper", "param")     # always a scalar decay, whatever shape was asked

TAGS: tuple = tuple(
    [f"motif.{m}" for m in ("hoisted", "diag", "mamba", "matrix", "semiring", "block", "delta", "householder",
                            "dense", "nonlinear")]
    + [f"{w}.decay.{s}" for w in ("vec", "mat", "delta") for s in DECAY_SPELLINGS]
    + ["vec.shape.scalar", "vec.shape.vector", "vec.mingru", "vec.identity", "vec.state_first",
       "mat.shape.scalar", "mat.shape.key", "mat.shape.value", "mat.identity", "mat.state_first",
       "mat.broadcast_outer", "mat.normaliser",
       "readout.new", "readout.prev", "readout.sum", "readout.free_q", "readout.two",
       "delta.ungated", "delta.gated", "delta.decay_first", "delta.kda", "delta.rwkv7", "delta.combined",
       "delta.beta_const", "delta.beta_one", "delta.beta_is_decay",
       "householder.n2", "householder.n3", "householder.loop", "householder.unrolled", "householder.nested",
       "householder.gated", "householder.combined",
       "seq.elman", "seq.indrnn", "seq.lstm", "seq.gru", "seq.diag_tanh", "seq.scalar_input",
       "step.concat", "step.split", "step.split_state", "leaf.scalar_input"])
_TAG_SET = frozenset(TAGS)


@dataclass
class _Cell:
    rng: random.Random
    name: str = "Fuzz"
    dims: list = field(default_factory=list)          # dim names, in order of first use
    dim_defaults: dict = field(default_factory=dict)  # dims with an integer default (NH=2)
    hypers: dict = field(default_factory=dict)        # hyper-parameters with a number default (gamma1=0.9)
    decls: list = field(default_factory=list)         # declaration lines
    stmts: list = field(default_factory=list)         # statement lines (may contain newlines: for loops)
    outputs: list = field(default_factory=list)       # output lines
    inputs: dict = field(default_factory=dict)        # name -> shape
    earlier: list = field(default_factory=list)       # (expr or a function making it, shape) of earlier states' values
    n_states: int = 0
    bare_outputs: set = field(default_factory=set)
    counter: int = 0
    tags: set = field(default_factory=set)

    def tag(self, *names: str) -> None:
        for n in names:
            if n not in _TAG_SET:
                raise AssertionError(f"fuzz generator: unregistered tag {n}")
            self.tags.add(n)

    # ---- names ----------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def dim(self, name: str) -> str:
        """Register the dim names of a size expression (`H`, `2*H`, `NH`)."""
        for n in re.findall(r"[A-Za-z_]\w*", name):
            if n not in self.dims and n not in self.dim_defaults:
                self.dims.append(n)
        return name

    def pick_dim(self, options=STATE_DIMS) -> str:
        return self.dim(self.rng.choice(options))

    def dim_default(self, value: int) -> str:
        """A dim with an integer default (NH=2), a fresh one if NH is taken with another value."""
        name = "NH"
        if name in self.dim_defaults and self.dim_defaults[name] != value:
            name = self.fresh("NH")
        self.dim_defaults[name] = value
        return name

    def hyper(self, value: str, prefix: str = "gamma") -> str:
        """A hyper-parameter of the cell line with a (non-integer) number default."""
        name = self.fresh(prefix)
        self.hypers[name] = value
        return name

    # ---- declarations ---------------------------------------------------------------
    def input(self, shape: Shape, reuse: float = 0.4) -> str:
        same = [n for n, s in self.inputs.items() if s == shape]
        if same and self.rng.random() < reuse:
            return self.rng.choice(same)
        for d in shape:
            self.dim(d)
        name = self.fresh("x")
        self.inputs[name] = shape
        self.decls.append(f"input {name}[{', '.join(shape)}]")
        return name

    def param(self, shape: Shape, init: str | None = None) -> str:
        for d in shape:
            self.dim(d)
        name = self.fresh("p")
        if init is None:
            fan = shape[-1] if shape else "1"
            init = self.rng.choice([f"~ normal(0, 1/sqrt({fan}))", f"~ uniform(-1/sqrt({fan}), 1/sqrt({fan}))",
                                    "~ normal(0, 0.5)"])
        self.decls.append(f"param {name}[{', '.join(shape)}] {init}")
        return name

    def state(self, shape: Shape, prefix: str = "h", init: str | None = None) -> str:
        for d in shape:
            self.dim(d)
        name = self.fresh(prefix)
        if init is None:
            r = self.rng.random()
            if r < 0.75:
                init = "= 0"
            elif r < 0.9:
                init = f"= {self.rng.choice(['0.5', '-0.25', '1'])}"
            else:  # a learned initial state
                init = "= " + self.param(shape, "~ normal(0, 0.3)")
        self.decls.append(f"state {name}[{', '.join(shape)}] {init}")
        self.n_states += 1
        return name

    def local(self, expr: str, prefix: str = "t") -> str:
        name = self.fresh(prefix)
        self.stmts.append(f"{name} = {expr}")
        return name

    def output(self, expr: str) -> None:
        base = expr.rstrip("'")
        bare = re.fullmatch(r"[A-Za-z_]\w*", base) is not None
        if self.rng.random() < 0.5 or (bare and base in self.bare_outputs):
            self.outputs.append(f"output {self.fresh('y')} = {expr}")
        else:
            self.outputs.append(f"output {expr}")
            if bare:
                self.bare_outputs.add(base)

    # ---- free expressions (no state of the motif being built) --------------------------
    def leaf(self, shape: Shape) -> str:
        return atom(self._leaf(shape))

    def _leaf(self, shape: Shape) -> str:
        """A value of `shape` of magnitude about 1 that reads no state of the current motif."""
        rng = self.rng
        ears = [e for e, s in self.earlier if s == shape]
        r = rng.random()
        if ears and r < 0.25:
            e = rng.choice(ears)
            e = e() if callable(e) else e
            return f"tanh({e})" if rng.random() < 0.7 else e
        if len(shape) == 1 and r < 0.55:
            d = self.dim("D") if rng.random() < 0.8 else self.pick_dim()
            W = self.param((shape[0], d))
            x = self.input((d,))
            return f"{W} @ {x}"
        if len(shape) == 1 and r < 0.62:  # a slice of a wider input
            d = shape[0]
            x = self.input((f"2*{d}",))
            return rng.choice([f"{x}[0:{d}]", f"{x}[{d}:2*{d}]"])
        if len(shape) == 0 and r < 0.2:  # a per-step scalar input, as it is
            self.tag("leaf.scalar_input")
            return self.input(())
        if len(shape) == 0 and r < 0.55:
            d = self.pick_dim(("D",) + STATE_DIMS)
            a = self.input((d,))
            return pick(rng, lambda: f"dot({a}, {self.input((d,))})", f"0.5 * sum({a})", f"mean({a})", f"amax({a})",
                        f"logsumexp({a}) - 1", lambda: f"dot({self.param((d,))}, {a})")
        if len(shape) == 2 and r < 0.6:
            return f"outer({self.leaf(shape[:1])}, {self.leaf(shape[1:])})"
        if r < 0.8 and shape:
            return self.param(shape) + " * " + self.input(shape)
        return self.input(shape)

    def free(self, shape: Shape, depth: int = 2) -> str:
        return atom(self._free(shape, depth))

    def _free(self, shape: Shape, depth: int = 2) -> str:
        rng = self.rng
        if depth <= 0 or rng.random() < 0.35:
            return self.leaf(shape)
        k = rng.random()
        sub = lambda: self.free(shape, depth - 1)  # noqa: E731
        if k < 0.30:
            return f"{rng.choice(['tanh', 'sigmoid', 'sin', 'silu', 'softplus', 'cos', 'gelu', 'elu'])}({sub()})"
        if k < 0.55:
            return f"{sub()} {rng.choice(['+', '-', '*'])} {sub()}"
        if k < 0.65:
            return f"{rng.choice(['0.5', '0.25', '2'])} * {sub()}"
        if k < 0.72 and shape:
            return f"{rng.choice(['l2norm', 'rmsnorm', 'layernorm', 'softmax'])}({sub()})"
        if k < 0.78:
            return f"{rng.choice(['max', 'min', 'logaddexp'])}({sub()}, {sub()})"
        if k < 0.83:
            return f"clamp({sub()}, -1, 1)"
        if k < 0.88:
            a = sub()
            return f"where({a} > 0, {a}, {sub()})"
        if k < 0.91 and len(shape) == 1:  # a local, so statements are exercised
            return self.local(sub())
        if k < 0.95 and len(shape) == 1:
            W = self.param((f"2*{shape[0]}", self.dim("D")))
            a, b = self.fresh("u"), self.fresh("u")
            self.stmts.append(f"{a}, {b} = split({W} @ {self.input(('D',))}, 2)")
            self.tag("step.split")
            return rng.choice([a, b])
        if k < 0.97 and len(shape) == 1:  # two halves put together
            d = shape[0]
            x = self.input((d,))
            W = self.param((d, f"{d}+D"))
            self.tag("step.concat")
            return f"{W} @ concat({x}, {self.input(('D',))})"
        return f"tanh({sub()})"

    def bounded(self, shape: Shape) -> str:
        return atom(self._bounded(shape))

    def _bounded(self, shape: Shape) -> str:
        """A value in [-1, 1] (or about that)."""
        e = self.free(shape)
        return e if self.rng.random() < 0.3 and e.startswith(("tanh(", "sigmoid(")) else f"tanh({e})"

    def gate(self, shape: Shape) -> str:
        return atom(self._gate(shape))

    def _gate(self, shape: Shape) -> str:
        """A decay in (0, 1)."""
        f = self.free(shape, 1)
        return self.rng.choice([f"sigmoid({f})", f"exp(-softplus({f}))", f"exp(logsigmoid({f}))",
                                f"1 - sigmoid({f})", f"0.5 + 0.5 * sigmoid({f})"])

    def log_gate(self, shape: Shape) -> str:
        return atom(self._log_gate(shape))

    def _log_gate(self, shape: Shape) -> str:
        """A log decay <= 0."""
        f = self.free(shape, 1)
        return self.rng.choice([f"logsigmoid({f})", f"-softplus({f})", f"logsigmoid({f}) / 4",
                                f"-0.1 * sigmoid({f})"])

    # ---- decays in every spelling ------------------------------------------------------
    def decay(self, shape: Shape, where: str, spellings=DECAY_SPELLINGS) -> tuple[str, Shape]:
        """A decay of magnitude <= 1 meant for `shape` ([] or [d]), in a random spelling,
        tagged `{where}.decay.{spelling}`: (expression, its shape). Scalar-only spellings
        (a constant, a hyper-parameter, a scalar param) give a scalar whatever the shape."""
        rng = self.rng
        options = [s for s in spellings if shape or s != "param_vec"]
        if shape and "param_vec" in options:  # the only vector-only spelling: as likely as the scalar-only ones
            options.append("param_vec")
        sp = rng.choice(options)
        self.tag(f"{where}.decay.{sp}")
        f = lambda: self.free(shape, 1)  # noqa: E731
        if sp == "const":
            return rng.choice(["0.9", "0.5", "0.95"]), ()
        if sp == "hyper":
            return self.hyper(rng.choice(["0.9", "0.5", "0.8"])), ()
        if sp == "param":
            return self.param((), f"= {rng.choice(['0.9', '0.5'])}"), ()
        if sp == "param_vec":
            return self.param(shape, f"= {rng.choice(['0.95', '0.9'])}"), shape
        if sp == "exp_neg_softplus":
            return f"exp(-softplus({f()}))", shape
        if sp == "exp_nonpos":
            lg = pick(rng, lambda: self.log_gate(shape), lambda: f"-abs({f()})", lambda: f"min({f()}, 0)",
                      lambda: f"-exp({self.param(shape, '~ uniform(-2.0, 0.0)')})",
                      lambda: f"-0.6065306597126334 * sigmoid({f()})")
            if rng.random() < 0.5:
                lg = self.local(lg, "lg")
            return f"exp({lg})", shape
        if sp == "sigmoid":
            return f"sigmoid({f()})", shape
        if sp == "one_minus_sigmoid":
            return f"1 - sigmoid({f()})", shape
        if sp == "sigmoid_pow":
            expo = pick(rng, "(1/4)", "0.5", "(1/8)", lambda: f"(1/{self.hyper('4.0', 'tau')})")
            return f"sigmoid({f()}) ** {expo}", shape
        if sp == "affine_sigmoid":
            return f"0.5 + 0.5 * sigmoid({f()})", shape
        if sp == "product":  # two gates, possibly a scalar one times a vector one
            other = rng.choice([shape, ()])
            a = rng.choice(["sigmoid({})", "exp(-softplus({}))", "exp(logsigmoid({}))"]).format(f())
            b = rng.choice(["sigmoid({})", "exp(-softplus({}))", "(1 - sigmoid({}))"]).format(self.free(other, 1))
            return f"{a} * {b}", shape
        # signed: magnitude <= 1, sometimes negative
        return rng.choice(["tanh({})", "0.9 * tanh({})", "cos({})", "-0.5 * sigmoid({})"]).format(f()), shape


def pick(rng: random.Random, *options):
    """One of the options, called if it is a function: only the chosen one declares the
    inputs and params it reads (a list of f-strings would declare them all)."""
    o = rng.choice(options)
    return o() if callable(o) else o


def atom(e: str) -> str:
    """`e`, parenthesised unless it is a name, a number or a call/index (an operand anywhere)."""
    depth = 0
    for i, ch in enumerate(e):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and (ch == " " or (ch == "-" and i == 0)):
            return f"({e})"
    return e


def _bind(c: _Cell, expr: str, prefix: str, p: float = 0.4) -> str:
    """expr, sometimes bound to a local first (the IR is the same; the text is not)."""
    if c.rng.random() < p and re.fullmatch(r"[A-Za-z_]\w*|[0-9.]+", expr) is None:
        return c.local(expr, prefix)
    return atom(expr)


# ---- motifs -------------------------------------------------------------------------
# Each adds one group of states (and usually outputs) to the cell and returns the values
# later motifs may read: [(expr, shape)].

def m_hoisted(c: _Cell):
    c.tag("motif.hoisted")
    shape = c.rng.choice([(c.pick_dim(),), ()])
    s = c.state(shape, "xp")
    c.stmts.append(f"{s}' = {c.free(shape, 1)}")
    if c.rng.random() < 0.7:
        c.output(f"{s} * {c.bounded(shape)}" if c.rng.random() < 0.5 else f"{s}'")
    return [(s, shape), (f"{s}'", shape)]


def m_diag(c: _Cell):
    """h' = a * h + b on a vector state: every decay spelling, scalar or vector; minGRU's
    (1 - z) h + z b; the identity; a state split in halves and put together again."""
    rng = c.rng
    c.tag("motif.diag")
    d = c.pick_dim()
    kind = rng.choice(["decay"] * 6 + ["mingru", "identity", "split_state"])
    if kind == "split_state":
        c.tag("step.split_state", "step.split", "step.concat")
        h = c.state((f"2*{d}",), "h")
        a, b = c.fresh("ha"), c.fresh("hb")
        c.stmts.append(f"{a}, {b} = split({h}, 2)")
        g1, _ = c.decay((d,), "vec")
        g2, _ = c.decay((d,), "vec")
        c.stmts.append(f"{h}' = concat({atom(g1)} * {a}, {atom(g2)} * {b}) + {c.bounded((f'2*{d}',))}")
        c.output(rng.choice([f"{h}'", f"{h}'[0:{d}] * {h}'[{d}:2*{d}]"]))
        return [(f"{h}'[0:{d}]", (d,))]
    shape = (d,)
    h = c.state(shape, "h")
    half = c.pick_dim() if rng.random() < 0.15 else d
    if half != d:  # the free term put together from halves
        c.tag("step.concat")
        b = atom(f"{c.param((d, f'2*{half}'))} @ concat({c.bounded((half,))}, {c.bounded((half,))})")
    else:
        b = c.bounded(shape)
    if kind == "decay":
        dshape = rng.choice([shape, shape, ()])
        g, gshape = c.decay(dshape, "vec")
        c.tag("vec.shape.vector" if gshape else "vec.shape.scalar")
        g = _bind(c, g, "g")
        if rng.random() < 0.2:
            c.tag("vec.state_first")
            upd = f"{h} * {g} + {b}"
        else:
            upd = f"{g} * {h} + {b}"
    elif kind == "mingru":
        c.tag("vec.mingru")
        z = c.local(f"sigmoid({c.free(shape, 1)})", "z")
        upd = f"(1 - {z}) * {h} + {z} * {b}"
    else:
        c.tag("vec.identity")
        upd = f"{h} + 0.25 * {b}"
    if rng.random() < 0.2:  # the free term first
        upd = f"{b} + " + upd.rsplit(f" + {b}", 1)[0] if upd.endswith(f" + {b}") else upd
    c.stmts.append(f"{h}' = {upd}")
    outs = [lambda: f"{h}'", lambda: f"{c.param((c.dim('D'), d))} @ {h}'",
            lambda: f"dot({c.input(shape)}, {h}')", lambda: f"{h}' * {c.input(shape)}",
            lambda: f"tanh({h}') * sigmoid({c.free(shape, 1)})", lambda: f"{h}", lambda: f"{h}' + {h}"]
    for o in rng.sample(outs, rng.choice([0, 1, 1, 2])):
        c.output(o())
    return [(h, shape), (f"{h}'", shape)]


def m_mamba(c: _Cell):
    """Elementwise-decayed matrix state [D, N] with an input-dependent step (Mamba)."""
    c.tag("motif.mamba")
    d, n = c.dim("H"), c.dim("N")
    h = c.state((d, n), "h")
    dt = c.local(f"softplus({c.free((d,), 1)})", "dt")
    A = c.param((d, n), "= log(arange(1, N+1))" if c.rng.random() < 0.5 else "~ uniform(-1, 0.5)")
    x = c.input((d,))
    Bv = c.free((n,), 1)
    c.stmts.append(f"{h}' = exp({dt}[:, None] * -exp({A})) * {h} + ({dt} * {x})[:, None] * ({Bv})[None, :]")
    C = c.input((n,))
    c.output(pick(c.rng, lambda: f"{h}' @ {C} + {c.param((d,))} * {x}", f"{h}' @ {C}", f"{h} @ {C}"))
    return [(f"{h}' @ {C}", (d,))]


def _matrix_decay(c: _Cell, K: str, V: str, where: str, sides=("scalar", "key", "key", "value")):
    """A decay of a [K, V] state, scalar, per key (`g[:, None]`) or per value (`g[None, :]`):
    (the factor as written in front of S, the decay itself, its side)."""
    side = c.rng.choice(sides)
    want = {"scalar": (), "key": (K,), "value": (V,)}[side]
    g, gshape = c.decay(want, where)
    side = side if gshape else "scalar"
    g = _bind(c, g, "g")
    factor = g if side == "scalar" else f"{g}[:, None]" if side == "key" else f"{g}[None, :]"
    return factor, g, side


def _readouts(c: _Cell, S: str, K: str, prev_ok: bool = True) -> list[str]:
    """One or two readouts of a [K, V] state: q @ S', q @ S, sum(S' * q[:, None], axis=0)."""
    rng = c.rng
    qs: list = []

    def q() -> str:  # one query input for all the readouts, declared when first read
        if not qs:
            qs.append(c.input((K,)))
        return qs[0]

    scale = rng.choice(["", " * K**-0.5", " * 0.5"])
    new = lambda: f"({q()}{scale}) @ {S}'" if scale else f"{q()} @ {S}'"  # noqa: E731
    outs = [("readout.new", new), ("readout.new", new), ("readout.new", new),
            ("readout.new", lambda: f"(l2norm({q()}) * K**-0.5) @ {S}'"),
            ("readout.free_q", lambda: f"{c.free((K,), 1)} @ {S}'"),
            ("readout.sum", lambda: pick(rng, lambda: f"sum({S}' * {q()}[:, None], axis=0)",
                                         lambda: f"sum({S} * {atom(c.free((K,), 1))}[:, None], axis=0)"))]
    if prev_ok:
        outs.append(("readout.prev", lambda: f"{q()} @ {S}"))
    n = rng.choice([1, 1, 1, 2])
    picked = rng.sample(outs, n)
    while n == 2 and picked[0][1] is picked[1][1]:  # two different readouts
        picked = rng.sample(outs, n)
    if n == 2:
        c.tag("readout.two")
    res = []
    for tag, o in picked:
        c.tag(tag)
        res.append(o())
    return res


def m_matrix(c: _Cell):
    """S[K, V] = decay * S + outer(k, v) (GLA, RetNet, linear attention), every decay spelling
    and side; read out as q @ S', q @ S or sum(S' * q[:, None], axis=0)."""
    rng = c.rng
    c.tag("motif.matrix")
    K, V = c.dim("K"), c.dim("V")
    S = c.state((K, V), "S", "= 0" if rng.random() < 0.8 else None)
    k = c.free((K,), 1)
    if rng.random() < 0.5:
        k = f"l2norm({k})"
    v = c.free((V,), 1)
    if rng.random() < 0.8:
        kv = f"outer({k}, {v})"
    else:
        c.tag("mat.broadcast_outer")
        kv = f"({k})[:, None] * ({v})[None, :]"
    if rng.random() < 0.3:
        kv = f"sigmoid({c.free((), 1)}) * {kv}"
    norm_ok = False
    if rng.random() < 0.15:
        c.tag("mat.identity")
        upd = f"{S} + {kv}"
        g, side = None, "identity"
        norm_ok = True
    else:
        factor, g, side = _matrix_decay(c, K, V, "mat")
        c.tag(f"mat.shape.{side}")
        norm_ok = side in ("scalar", "key")
        if rng.random() < 0.2:
            c.tag("mat.state_first")
            upd = f"{S} * {factor} + {kv}"
        else:
            upd = f"{factor} * {S} + {kv}"
    c.stmts.append(f"{S}' = {upd}")
    if norm_ok and rng.random() < 0.25:  # a normaliser state, an epilogue
        c.tag("mat.normaliser")
        z = c.state((K,), "z", "= 0")
        decay = "" if g is None else f"{g} * "
        c.stmts.append(f"{z}' = {decay}{z} + {k}")
        q = c.input((K,))
        picked = [f"({q} @ {S}') / (1 + abs(dot({q}, {z}')))"]
    else:
        picked = _readouts(c, S, K)
    for o in picked:
        c.output(o)
    return [(lambda: f"{c.input((K,), reuse=1.0)} @ {S}'", (V,))]


def m_semiring(c: _Cell):
    """A max-plus / log-sum-exp stabiliser m and (often) exp-stabilised followers (mLSTM, Aaren)."""
    rng = c.rng
    c.tag("motif.semiring")
    vec = rng.random() < 0.3
    d = c.pick_dim(("H", "N")) if vec else None
    shape = (d,) if vec else ()
    m = c.state(shape, "m", rng.choice(["= 0", "= 0", "= -1e9"]) if not vec else "= 0")
    op = rng.choice(["max", "max", "logaddexp"])
    lf = c.local(c.log_gate(shape), "lf") if rng.random() < 0.8 else None
    i = c.local(c.free(shape, 1), "ig")
    upd = f"{op}({m} + {lf}, {i})" if lf else f"{op}({m}, {i})"
    c.stmts.append(f"{m}' = {upd}")
    f_expr = f"exp({lf} + {m} - {m}')" if lf else f"exp({m} - {m}')"
    i_expr = f"exp({i} - {m}')"
    follow = rng.random()
    if follow < 0.4 and not vec:  # mLSTM
        K, V = c.dim("K"), c.dim("V")
        C = c.state((K, V), "C", "= 0")
        n = c.state((K,), "n", "= 0")
        fg = c.local(f_expr, "f")
        ig = c.local(i_expr, "i")
        k, v = c.free((K,), 1), c.free((V,), 1)
        kn = c.local(f"l2norm({k})" if rng.random() < 0.5 else k, "k")
        c.stmts.append(f"{C}' = {fg} * {C} + {ig} * outer({kn}, {v})")
        c.stmts.append(f"{n}' = {fg} * {n} + {ig} * {kn}")
        q = c.local(f"{c.input((K,))} * K**-0.5", "q")
        c.output(f"({q} @ {C}') / max(abs(dot({q}, {n}')), exp(-{m}'))")
        return [(f"{q} @ {C}'", (V,))]
    if follow < 0.75:  # Aaren / sLSTM-like vector followers
        d2 = d or c.pick_dim(("H", "N", "V"))
        num = c.state((d2,), "num", "= 0")
        den = c.state(shape, "den", "= 0")
        fg = c.local(f_expr, "f")
        ig = c.local(i_expr, "i")
        c.stmts.append(f"{num}' = {fg} * {num} + {ig} * {c.bounded((d2,))}")
        c.stmts.append(f"{den}' = {fg} * {den} + {ig}")
        c.output(f"{num}' / {den}'")
        return [(f"{num}' / {den}'", (d2,))]
    c.output(rng.choice([f"{m}'", f"exp({m} - {m}')", f"{m}' - {m}"]))
    return [(f"tanh({m}')", shape)]


def m_block(c: _Cell):
    """2x2 rotation-scaling blocks (LRU as real pairs)."""
    rng = c.rng
    c.tag("motif.block")
    n = c.pick_dim(("N", "H"))
    hr, hi = c.state((n,), "hr", "= 0"), c.state((n,), "hi", "= 0")
    r = c.local(pick(rng, lambda: f"exp(-exp({c.param((n,), '~ uniform(-2.0, 0.0)')}))",
                     lambda: f"sigmoid({c.param((n,))})", lambda: f"0.9 * sigmoid({c.free((n,), 1)})"), "r")
    th = c.local(pick(rng, lambda: c.param((n,), "~ uniform(-1.0, 1.0)"),
                      lambda: f"exp({c.param((n,), '~ uniform(-1.0, 1.0)')})", lambda: f"{c.free((n,), 1)}"), "th")
    g = c.local(rng.choice([f"sqrt(1 - {r} * {r})", "1", f"1 - {r}"]), "gn")
    c.stmts.append(f"{hr}' = {r} * cos({th}) * {hr} - {r} * sin({th}) * {hi} + {g} * {c.bounded((n,))}")
    c.stmts.append(f"{hi}' = {r} * sin({th}) * {hr} + {r} * cos({th}) * {hi} + {g} * {c.bounded((n,))}")
    D = c.dim("D")
    c.output(pick(rng, lambda: f"{c.param((D, n))} @ {hr}' - {c.param((D, n))} @ {hi}'", f"{hr}' + {hi}'",
                  f"{hr}' * {hi}'", f"{hr}"))
    return [(f"{hr}'", (n,))]


def _key(c: _Cell, K: str, prefix: str = "kn") -> str:
    """An l2-normalised key (a local)."""
    return c.local(f"l2norm({c.free((K,), 1)})", prefix)


def _strength(c: _Cell, prefix: str = "beta") -> str:
    """A delta-rule strength in (0, 1) (a local)."""
    return c.local(f"sigmoid({c.free((), 1)})", prefix)


def m_delta(c: _Cell):
    """The delta rule on S[K, V] with l2-normalised keys and strengths in (0, 1]: ungated;
    gated by a scalar decay `a * (S - b outer(k, k @ S)) + b outer(k, v)` (every spelling);
    decay first `Sd = a * S; Sd - b outer(k, k @ Sd) + ...` (scalar: gated, per key: KDA);
    RWKV-7-like `w[:, None] * S - outer(a * k, k @ S) + outer(k2, v)`; and the combined
    spelling `S + b * outer(k, v - k @ S)`. The strength b is sigmoid(.) of the step,
    sometimes a constant, left out (b = 1), or the very gate that decays the state."""
    rng = c.rng
    c.tag("motif.delta")
    K, V = c.dim("K"), c.dim("V")
    S = c.state((K, V), "S", "= 0")
    kind = rng.choice(["ungated", "gated", "gated", "decay_first", "kda", "kda", "rwkv7", "rwkv7", "combined"])
    c.tag(f"delta.{kind}")
    kn = _key(c, K)
    v = c.free((V,), 1)
    strength = rng.choice(["sigmoid"] * 5 + ["const", "one"] + (["same"] if kind in ("gated", "decay_first") else []))
    if strength == "sigmoid":
        beta = _strength(c)
        b = f"{beta} * "
    elif strength == "const":
        c.tag("delta.beta_const")
        beta = pick(rng, "0.5", lambda: c.hyper("0.5", "beta"))
        b = f"{beta} * "
    elif strength == "one":
        c.tag("delta.beta_one")
        beta, b = "1", ""
    else:  # the strength is the decay gate itself (one node for both)
        c.tag("delta.beta_is_decay", "delta.decay.sigmoid")
        beta = c.local(f"sigmoid({c.free((), 1)})", "g")
        b = f"{beta} * "
    if kind == "ungated":
        upd = f"{S} - {b}outer({kn}, {kn} @ {S}) + {b}outer({kn}, {v})"
    elif kind == "combined":
        upd = pick(rng, f"{S} + {b}outer({kn}, {v} - {kn} @ {S})",
                   f"{S} + outer({kn}, {v} - {kn} @ {S})" if not b else f"{S} + outer({beta} * {kn}, {v} - {kn} @ {S})")
    elif kind == "gated":
        if strength == "same":
            g = beta
        else:
            g, _ = c.decay((), "delta")
            g = _bind(c, g, "g")
        upd = f"{g} * ({S} - {b}outer({kn}, {kn} @ {S})) + {b}outer({kn}, {v})"
    elif kind in ("decay_first", "kda"):
        if strength == "same":
            g, gshape = beta, ()
        else:
            g, gshape = c.decay(() if kind == "decay_first" else (K,), "delta")
            g = _bind(c, g, "g")
        Sd = c.local(f"{g}[:, None] * {S}" if gshape else f"{g} * {S}", "Sd")
        upd = f"{Sd} - {b}outer({kn}, {kn} @ {Sd}) + {b}outer({kn}, {v})"
    else:  # rwkv7: a per-key decay and a rank-1 term whose left vector is not the key
        g, gshape = c.decay((K,), "delta")
        g = _bind(c, g, "w")
        a = c.local(f"sigmoid({c.free((K,), 1)})", "a")
        w = f"{g}[:, None]" if gshape else g
        k2 = pick(rng, kn, lambda: c.free((K,), 1), f"{kn} * {a}")
        upd = f"{w} * {S} - outer({a} * {kn}, {kn} @ {S}) + {b}outer({k2}, {v})"
    c.stmts.append(f"{S}' = {upd}")
    return _read_out(c, S, K, V)


def _read_out(c: _Cell, S: str, K: str, V: str) -> list:
    """The delta-rule motifs' outputs (readouts of S), and the value later motifs may read."""
    for o in _readouts(c, S, K):
        c.output(o)
    return [(lambda: f"{c.input((K,), reuse=1.0)} @ {S}'", (V,))]


def m_householder(c: _Cell):
    """DeltaProduct: n = 2 or 3 delta-rule steps per token applied in turn (Householder
    products), with l2-normalised keys and strengths sigmoid(.): in a `for` loop over
    k[NH, K], unrolled into locals, or nested into one expression; sometimes a scalar decay
    first, sometimes steps written `acc + b * outer(k, v - k @ acc)`."""
    rng = c.rng
    c.tag("motif.householder")
    K, V = c.dim("K"), c.dim("V")
    S = c.state((K, V), "S", "= 0")
    n = rng.choice([2, 3])
    style = rng.choice(["loop", "unrolled", "nested"]) if n == 2 else rng.choice(["loop", "unrolled"])
    c.tag(f"householder.n{n}", f"householder.{style}")
    combined = rng.random() < 0.2
    if combined:
        c.tag("householder.combined")

    def step(acc: str, k: str, b: str, v: str) -> str:
        if combined:
            return f"{acc} + {b} * outer({k}, {v} - {k} @ {acc})"
        return f"{acc} - {b} * outer({k}, {k} @ {acc}) + {b} * outer({k}, {v})"

    start = S
    if rng.random() < 0.2:
        c.tag("householder.gated")
        g, _ = c.decay((), "delta", ("exp_nonpos", "sigmoid", "const", "exp_neg_softplus"))
        start = c.local(f"{atom(g)} * {S}", "acc")
    if style == "loop":
        NH = c.dim_default(n)
        k, v, beta = c.input((NH, K)), c.input((NH, V)), c.input((NH,))
        acc, kj, bj = c.fresh("acc"), c.fresh("kj"), c.fresh("bj")
        c.stmts.append(f"{acc} = {start}")
        c.stmts.append(f"for j in range({NH}):\n        {kj} = l2norm({k}[j])\n        {bj} = sigmoid({beta}[j])\n"
                       f"        {acc} = {step(acc, kj, bj, f'{v}[j]')}")
        c.stmts.append(f"{S}' = {acc}")
    else:
        keys = [_key(c, K, "k") for _ in range(n)]
        betas = [_strength(c, "b") for _ in range(n)]
        vals = [c.free((V,), 1) for _ in range(n)]
        if style == "unrolled":
            acc = start
            for j in range(n):
                nxt = step(acc, keys[j], betas[j], vals[j])
                acc = c.local(nxt, "acc") if j < n - 1 else nxt
            c.stmts.append(f"{S}' = {acc}")
        else:  # nested: one expression, the first step written out twice
            first = f"({step(start, keys[0], betas[0], vals[0])})"
            c.stmts.append(f"{S}' = {step(first, keys[1], betas[1], vals[1])}")
    return _read_out(c, S, K, V)


def m_dense(c: _Cell):
    """h' = A h + b with a contraction A (|A| row sums < 1), possibly input-gated."""
    rng = c.rng
    c.tag("motif.dense")
    d = c.pick_dim(("H", "N"))
    h = c.state((d,), "h")
    A = c.param((d, d), rng.choice([f"~ uniform(-0.9/{d}, 0.9/{d})", f"~ normal(0, 0.3/{d})"]))
    kind = rng.choice(["plain", "gated", "two"])
    b = c.bounded((d,))
    if kind == "plain":
        upd = f"{A} @ {h} + {b}"
    elif kind == "gated":
        upd = f"{c.gate((d,))} * ({A} @ {h}) + {b}"
    else:
        upd = f"0.5 * {h} @ {A} + 0.4 * ({A} @ {h}) + {b}"
    c.stmts.append(f"{h}' = {upd}")
    c.output(pick(rng, f"{h}'", lambda: f"{c.param((c.dim('D'), d))} @ {h}'", f"tanh({h}')"))
    return [(f"{h}'", (d,))]


def m_nonlinear(c: _Cell):
    """Sequential cells: Elman, IndRNN, LSTM, GRU, a decayed tanh; sometimes reading a
    per-step scalar input (`z * u`, a scalar update gate) or `concat(x, h)`."""
    rng = c.rng
    c.tag("motif.nonlinear")
    kind = rng.choice(["elman", "indrnn", "lstm", "gru", "diag_tanh"])
    c.tag(f"seq.{kind}")
    d = c.pick_dim(("H", "N"))
    shape = (d,)
    D = c.dim("D")
    scalar_in = rng.random() < 0.4
    cat = rng.random() < 0.4

    def zterm() -> str:  # a per-step scalar input times a vector
        z = c.input(())
        c.tag("seq.scalar_input")
        return pick(rng, lambda: f" + {z} * {c.param(shape)}", lambda: f" + {z} * {c.free(shape, 1)}", f" + 0.5 * {z}")

    if kind == "elman":
        h = c.state(shape, "h")
        if cat:
            c.tag("step.concat")
            x = c.input((D,))
            init = f"~ uniform(-1/sqrt({D}+{d}), 1/sqrt({D}+{d}))"
            if rng.random() < 0.5:
                pre = f"{c.param((d, f'{D}+{d}'), init)} @ concat({x}, {h})"
            else:
                pre = f"{c.param((d, f'{d}+{D}'), init)} @ concat({h}, {x})"
        else:
            W = c.param((d, d), f"~ uniform(-1/sqrt({d}), 1/sqrt({d}))")
            pre = f"{W} @ {h} + {c.free(shape, 1)}"
        if scalar_in:
            pre += zterm()
        c.stmts.append(f"{h}' = tanh({pre})")
        c.output(f"{h}'")
        return [(f"{h}'", shape)]
    if kind == "indrnn":
        h = c.state(shape, "h")
        u = c.param(shape, "~ uniform(-0.9, 0.9)")
        pre = f"{u} * {h} + {c.free(shape, 1)}" + (zterm() if scalar_in else "")
        c.stmts.append(f"{h}' = {rng.choice(['relu', 'tanh'])}({pre})")
        c.output(f"{h}'")
        return [(f"{h}'", shape)]
    if kind == "diag_tanh":
        h = c.state(shape, "h")
        if scalar_in:  # a scalar per-step gate
            z = c.input(())
            c.tag("seq.scalar_input")
            c.stmts.append(f"{h}' = sigmoid({z}) * tanh({h}) + (1 - sigmoid({z})) * {c.bounded(shape)}")
        else:
            c.stmts.append(f"{h}' = {c.gate(shape)} * tanh({h}) + {c.bounded(shape)}")
        c.output(f"{h}'")
        return [(f"{h}'", shape)]
    c.tag("step.split")
    x = c.input((D,))
    if kind == "lstm":
        h, cc = c.state(shape, "h"), c.state(shape, "c")
        if cat:
            c.tag("step.concat")
            pre = f"{c.param((f'4*{d}', f'{D}+{d}'))} @ concat({x}, {h})"
        else:
            pre = f"{c.param((f'4*{d}', D))} @ {x} + {c.param((f'4*{d}', d))} @ {h}"
        if scalar_in:
            z = c.input(())
            c.tag("seq.scalar_input")
            pre += f" + {z} * {c.param((f'4*{d}',))}"
        names = [c.fresh(p) for p in ("i", "f", "g", "o")]
        c.stmts.append(f"{', '.join(names)} = split({pre}, 4)")
        i, f, g, o = names
        c.stmts.append(f"{cc}' = sigmoid({f}) * {cc} + sigmoid({i}) * tanh({g})")
        c.stmts.append(f"{h}' = sigmoid({o}) * tanh({cc}')")
        c.output(rng.choice([f"{h}'", f"{cc}'"]))
        return [(f"{h}'", shape)]
    # gru
    h = c.state(shape, "h")
    W = c.param((f"3*{d}", D))
    U = c.param((d, d))
    xr, xz, xn = (c.fresh(p) for p in ("xr", "xz", "xn"))
    hr, hz = c.fresh("hr"), c.fresh("hz")
    c.stmts.append(f"{xr}, {xz}, {xn} = split({W} @ {x}, 3)")
    if cat:
        c.tag("step.concat")
        c.stmts.append(f"{hr}, {hz} = split({c.param((f'2*{d}', f'{D}+{d}'))} @ concat({x}, {h}), 2)")
    else:
        c.stmts.append(f"{hr}, {hz} = split({c.param((f'2*{d}', d))} @ {h}, 2)")
    r = c.local(f"sigmoid({xr} + {hr})", "r")
    if scalar_in:  # the update gate is a per-step scalar
        c.tag("seq.scalar_input")
        z = c.local(f"sigmoid({c.input(())})", "z")
    else:
        z = c.local(f"sigmoid({xz} + {hz})", "z")
    n = c.local(f"tanh({xn} + {r} * ({U} @ {h}))", "n")
    c.stmts.append(f"{h}' = (1 - {z}) * {n} + {z} * {h}")
    c.output(f"{h}'")
    return [(f"{h}'", shape)]


# (motif, weight, states it adds)
MOTIFS = [
    (m_diag, 6, 1), (m_matrix, 7, 1), (m_semiring, 3, 3), (m_delta, 7, 1), (m_householder, 2, 1),
    (m_block, 2, 2), (m_dense, 2, 1), (m_nonlinear, 4, 2), (m_hoisted, 1, 1), (m_mamba, 2, 1),
]


def generate_tagged(rng: random.Random, name: str = "Fuzz") -> tuple[str, list[str]]:
    """(source, tags): one random well-typed cell with 1 to 3 (occasionally 4) states, and
    the sorted tags (of TAGS) of the motifs and spellings it was built from."""
    c = _Cell(rng, name=name)
    n_motifs = rng.choice([1, 1, 2, 2, 2, 3])
    for k in range(n_motifs):
        room = 3 - c.n_states
        options = [(m, w) for m, w, s in MOTIFS if s <= max(room, 1)]
        if k and room <= 0:
            break
        motif = rng.choices([m for m, _ in options], [w for _, w in options])[0]
        c.earlier.extend(motif(c))
    if not c.outputs:
        e, shape = c.earlier[-1]
        e = e() if callable(e) else e
        c.output(e if not shape or rng.random() < 0.5 else f"tanh({e})")
    return render(c), sorted(c.tags)


def generate(rng: random.Random, name: str = "Fuzz") -> str:
    """The source text of one random well-typed cell with 1 to 3 (occasionally 4) states."""
    return generate_tagged(rng, name)[0]


def render(c: _Cell) -> str:
    args = ([d for d in c.dims if d not in c.dim_defaults] + [f"{d}={v}" for d, v in c.dim_defaults.items()]
            + [f"{h}={v}" for h, v in c.hypers.items()])
    lines = [f"cell {c.name}({', '.join(args)}):"]
    decls = sorted(c.decls, key=lambda s: ("input", "param", "state").index(s.split()[0]))
    lines += ["    " + d for d in decls]
    lines += ["    " + s for s in c.stmts]
    lines += ["    " + o for o in c.outputs]
    return "\n".join(lines) + "\n"


# ---- frontend mutants -----------------------------------------------------------------
# Mutations of valid sources (as tests/frontend/test_mutation.py): tokens or lines deleted,
# duplicated, swapped or replaced, junk inserted, indentation broken. A mutant must be
# accepted or rejected with a RecError, never any other exception.

JUNK = list("()[]{}:;,.=~+-*/@<>!'\"\\#\t \n\r_0123456789eE") + [
    "**", "'''", '"""', "λ", "é", "\u00a0", "\u200b", "\x00", "None", "on", "edge", "cell", "for", "output",
    "state", "lambda", "__import__", "1.2.3", "3x", "1e", "sum_in", "split", "outer", "[:, None]", "[0:2]",
    "range", "heads", "over", "dag", "param", "input", "T", "prev", "axis", "-1", "1e400", "2**70"]
_TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*'?|\d+\.?\d*(?:[eE][+-]?\d+)?|\*\*|\"\"\"|[^\sA-Za-z0-9_]|\n[ \t]*")


def mutate(source: str, rng: random.Random, max_mutations: int = 4) -> str:
    src = source
    for _ in range(rng.randint(1, max_mutations)):
        kind = rng.choice(["del_tok", "dup_tok", "swap_tok", "del_line", "dup_line", "swap_line", "insert",
                           "replace_tok", "copy_tok", "indent"])
        toks = [m.span() for m in _TOKEN_RE.finditer(src)]
        lines = src.split("\n")
        if kind.endswith("_tok") and toks:
            a, b = rng.choice(toks)
            if kind == "del_tok":
                src = src[:a] + src[b:]
            elif kind == "dup_tok":
                src = src[:b] + src[a:b] + src[b:]
            elif kind == "replace_tok":
                src = src[:a] + rng.choice(JUNK) + src[b:]
            elif kind == "copy_tok":
                c, d = rng.choice(toks)
                src = src[:a] + src[c:d] + src[b:]
            else:
                (a, b), (c, d) = sorted([(a, b), rng.choice(toks)])
                if b <= c:
                    src = src[:a] + src[c:d] + src[b:c] + src[a:b] + src[d:]
        elif kind.endswith("_line") and lines:
            i = rng.randrange(len(lines))
            if kind == "del_line":
                del lines[i]
            elif kind == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = rng.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
            src = "\n".join(lines)
        elif kind == "indent" and lines:
            i = rng.randrange(len(lines))
            lines[i] = rng.choice([" ", "  ", "\t", "        ", ""]) + lines[i].lstrip(" " if rng.random() < 0.5 else "")
            src = "\n".join(lines)
        else:
            pos = rng.randint(0, len(src))
            src = src[:pos] + rng.choice(JUNK) + src[pos:]
    return src
