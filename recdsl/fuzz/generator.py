"""Random well-typed cells, as .rec source text.

A cell is put together from *motifs*, each one recurrence of a known shape with random
parts: a gated vector recurrence, a matrix state fed by outer products (read out as
`q @ S'`), a max-plus / log-sum-exp stabiliser with exp-stabilised followers (mLSTM-like),
2x2 rotation blocks (LRU-like), the (gated, key-decayed, rank-2) delta rule, a dense
contraction `A @ h`, and nonlinear cells (Elman, IndRNN, LSTM/GRU-like), plus states that
read no state at all (hoisted). Later motifs may read earlier states (multi-stage cells,
"given m"); the free parts (gates, values, keys) are random expressions of inputs,
params and earlier states.

Numerically tame by construction: every decay is a sigmoid / exp of a non-positive value,
dense transitions are contractions (|A| row sums < 1), values are tanh'd or small, so
that a disagreement between backends is a real one and not round-off amplified by an
exploding recurrence.

`generate(rng)` returns the source text of one cell; every generated cell parses and
checks (a cell that does not is a bug of this generator, tested in tests/fuzz)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

Shape = tuple  # of dim names (str), e.g. ("K", "V"); () is a scalar

# Dims a cell may use: D for input widths, the others for states.
STATE_DIMS = ("H", "N", "K", "V")


@dataclass
class _Cell:
    rng: random.Random
    name: str = "Fuzz"
    dims: list = field(default_factory=list)          # dim names, in order of first use
    dim_defaults: dict = field(default_factory=dict)  # dims with an integer default (NH=2)
    decls: list = field(default_factory=list)         # declaration lines
    stmts: list = field(default_factory=list)         # statement lines (may contain newlines: for loops)
    outputs: list = field(default_factory=list)       # output lines
    inputs: dict = field(default_factory=dict)        # name -> shape
    earlier: list = field(default_factory=list)       # (expr, shape) of earlier states' values
    n_states: int = 0
    bare_outputs: set = field(default_factory=set)
    counter: int = 0

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
        if len(shape) == 0 and r < 0.55:
            d = self.pick_dim(("D",) + STATE_DIMS)
            a, b = self.input((d,)), self.input((d,))
            return rng.choice([f"dot({a}, {b})", f"0.5 * sum({a})", f"mean({a})", f"amax({a})",
                               f"logsumexp({a}) - 1", f"dot({self.param((d,))}, {a})"])
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
        if k < 0.93 and len(shape) == 1:  # a local, so statements are exercised
            return self.local(sub())
        if k < 0.97 and len(shape) == 1:
            W = self.param((f"2*{shape[0]}", self.dim("D")))
            a, b = self.fresh("u"), self.fresh("u")
            self.stmts.append(f"{a}, {b} = split({W} @ {self.input(('D',))}, 2)")
            return rng.choice([a, b])
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


# ---- motifs -------------------------------------------------------------------------
# Each adds one group of states (and usually outputs) to the cell and returns the values
# later motifs may read: [(expr, shape)].

def m_hoisted(c: _Cell):
    shape = c.rng.choice([(c.pick_dim(),), ()])
    s = c.state(shape, "xp")
    c.stmts.append(f"{s}' = {c.free(shape, 1)}")
    if c.rng.random() < 0.7:
        c.output(f"{s} * {c.bounded(shape)}" if c.rng.random() < 0.5 else f"{s}'")
    return [(s, shape), (f"{s}'", shape)]


def m_diag(c: _Cell):
    rng = c.rng
    d = c.pick_dim()
    shape = (d,)
    h = c.state(shape, "h")
    kind = rng.choice(["vector", "scalar", "mingru", "log", "identity", "param"])
    b = c.bounded(shape)
    if kind == "vector":
        upd = f"{c.gate(shape)} * {h} + {b}"
    elif kind == "scalar":
        upd = f"{c.gate(())} * {h} + {b}"
    elif kind == "mingru":
        z = c.local(f"sigmoid({c.free(shape, 1)})", "z")
        upd = f"(1 - {z}) * {h} + {z} * {b}"
    elif kind == "log":
        lg = c.local(c.log_gate(rng.choice([shape, ()])), "lg")
        upd = f"exp({lg}) * {h} + {b}"
    elif kind == "identity":
        upd = f"{h} + 0.25 * {b}"
    else:
        upd = f"sigmoid({c.param(shape)}) * {h} + {b}"
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
    d, n = c.dim("H"), c.dim("N")
    h = c.state((d, n), "h")
    dt = c.local(f"softplus({c.free((d,), 1)})", "dt")
    A = c.param((d, n), "= log(arange(1, N+1))" if c.rng.random() < 0.5 else "~ uniform(-1, 0.5)")
    x = c.input((d,))
    Bv = c.free((n,), 1)
    c.stmts.append(f"{h}' = exp({dt}[:, None] * -exp({A})) * {h} + ({dt} * {x})[:, None] * ({Bv})[None, :]")
    C = c.input((n,))
    c.output(c.rng.choice([f"{h}' @ {C} + {c.param((d,))} * {x}", f"{h}' @ {C}", f"{h} @ {C}"]))
    return [(f"{h}' @ {C}", (d,))]


def m_matrix(c: _Cell):
    """S[K, V] = decay * S + outer(k, v), read out as q @ S' (GLA, RetNet, linear attention)."""
    rng = c.rng
    K, V = c.dim("K"), c.dim("V")
    S = c.state((K, V), "S", "= 0" if rng.random() < 0.8 else None)
    k = c.free((K,), 1)
    if rng.random() < 0.5:
        k = f"l2norm({k})"
    v = c.free((V,), 1)
    kind = rng.choice(["scalar", "scalar", "vector", "vector", "identity", "scalar_gate"])
    kv = f"outer({k}, {v})" if rng.random() < 0.8 else f"({k})[:, None] * ({v})[None, :]"
    if rng.random() < 0.3:
        kv = f"sigmoid({c.free((), 1)}) * {kv}"
    if kind == "scalar":
        g = c.local(c.log_gate(()), "g")
        upd = f"exp({g}) * {S} + {kv}"
    elif kind == "vector":
        g = c.local(c.log_gate((K,)), "gk")
        upd = f"exp({g})[:, None] * {S} + {kv}"
    elif kind == "scalar_gate":
        upd = f"{c.gate(())} * {S} + {kv}"
    else:
        upd = f"{S} + {kv}"
    c.stmts.append(f"{S}' = {upd}")
    q = c.input((K,))
    scale = rng.choice(["", " * K**-0.5", " * 0.5"])
    outs = [lambda: f"({q}{scale}) @ {S}'" if scale else f"{q} @ {S}'", lambda: f"{q} @ {S}",
            lambda: f"{c.free((K,), 1)} @ {S}'"]
    picked = [o() for o in rng.sample(outs, rng.choice([1, 1, 2]))]
    if rng.random() < 0.3 and kind in ("scalar", "vector", "identity"):  # a normaliser state, an epilogue
        z = c.state((K,), "z", "= 0")
        decay = "" if kind == "identity" else f"exp({g}) * "
        c.stmts.append(f"{z}' = {decay}{z} + {k}")
        picked = [f"({q} @ {S}') / (1 + abs(dot({q}, {z}')))"]
    for o in picked:
        c.output(o)
    return [(f"{q} @ {S}'", (V,))]


def m_semiring(c: _Cell):
    """A max-plus / log-sum-exp stabiliser m and (often) exp-stabilised followers (mLSTM, Aaren)."""
    rng = c.rng
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
    n = c.pick_dim(("N", "H"))
    hr, hi = c.state((n,), "hr", "= 0"), c.state((n,), "hi", "= 0")
    r = c.local(rng.choice([f"exp(-exp({c.param((n,), '~ uniform(-2.0, 0.0)')}))",
                            f"sigmoid({c.param((n,))})", f"0.9 * sigmoid({c.free((n,), 1)})"]), "r")
    th = c.local(rng.choice([c.param((n,), "~ uniform(-1.0, 1.0)"), f"exp({c.param((n,), '~ uniform(-1.0, 1.0)')})",
                             f"{c.free((n,), 1)}"]), "th")
    g = c.local(rng.choice([f"sqrt(1 - {r} * {r})", "1", f"1 - {r}"]), "gn")
    c.stmts.append(f"{hr}' = {r} * cos({th}) * {hr} - {r} * sin({th}) * {hi} + {g} * {c.bounded((n,))}")
    c.stmts.append(f"{hi}' = {r} * sin({th}) * {hr} + {r} * cos({th}) * {hi} + {g} * {c.bounded((n,))}")
    D = c.dim("D")
    c.output(rng.choice([f"{c.param((D, n))} @ {hr}' - {c.param((D, n))} @ {hi}'", f"{hr}' + {hi}'",
                         f"{hr}' * {hi}'", f"{hr}"]))
    return [(f"{hr}'", (n,))]


def m_delta(c: _Cell):
    """The delta rule: ungated, gated (scalar), key-side decay (KDA), rank 2 (DeltaProduct)."""
    rng = c.rng
    K, V = c.dim("K"), c.dim("V")
    S = c.state((K, V), "S", "= 0")
    kind = rng.choice(["ungated", "gated", "gated", "kda", "product"])
    q = c.input((K,))
    if kind == "product":
        c.dim_defaults["NH"] = 2
        k = c.input(("NH", "K"))
        v = c.input(("NH", "V"))
        beta = c.input(("NH",))
        acc, kj = c.fresh("acc"), c.fresh("kj")
        c.stmts.append(f"{acc} = {S}")
        c.stmts.append(f"for j in range(NH):\n        {kj} = l2norm({k}[j])\n"
                       f"        {acc} = {acc} - sigmoid({beta}[j]) * outer({kj}, {kj} @ {acc})"
                       f" + sigmoid({beta}[j]) * outer({kj}, {v}[j])")
        c.stmts.append(f"{S}' = {acc}")
    else:
        kn = c.local(f"l2norm({c.free((K,), 1)})", "kn")
        v = c.free((V,), 1)
        beta = c.local(f"sigmoid({c.free((), 1)})", "beta")
        if kind == "ungated":
            upd = f"{S} - {beta} * outer({kn}, {kn} @ {S}) + {beta} * outer({kn}, {v})"
        elif kind == "gated":
            g = c.local(c.log_gate(()), "g")
            upd = f"exp({g}) * ({S} - {beta} * outer({kn}, {kn} @ {S})) + {beta} * outer({kn}, {v})"
        else:
            g = c.local(c.log_gate((K,)), "gk")
            Sd = c.local(f"exp({g})[:, None] * {S}", "Sd")
            upd = f"{Sd} - {beta} * outer({kn}, {kn} @ {Sd}) + {beta} * outer({kn}, {v})"
        c.stmts.append(f"{S}' = {upd}")
    c.output(rng.choice([f"{q} @ {S}'", f"(l2norm({q}) * K**-0.5) @ {S}'", f"{q} @ {S}'"]))
    return [(f"{q} @ {S}'", (V,))]


def m_dense(c: _Cell):
    """h' = A h + b with a contraction A (|A| row sums < 1), possibly input-gated."""
    rng = c.rng
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
    c.output(rng.choice([f"{h}'", f"{c.param((c.dim('D'), d))} @ {h}'", f"tanh({h}')"]))
    return [(f"{h}'", (d,))]


def m_nonlinear(c: _Cell):
    rng = c.rng
    kind = rng.choice(["elman", "indrnn", "lstm", "gru", "diag_tanh"])
    d = c.pick_dim(("H", "N"))
    shape = (d,)
    D = c.dim("D")
    if kind == "elman":
        h = c.state(shape, "h")
        W = c.param((d, d), f"~ uniform(-1/sqrt({d}), 1/sqrt({d}))")
        c.stmts.append(f"{h}' = tanh({W} @ {h} + {c.free(shape, 1)})")
        c.output(f"{h}'")
        return [(f"{h}'", shape)]
    if kind == "indrnn":
        h = c.state(shape, "h")
        u = c.param(shape, "~ uniform(-0.9, 0.9)")
        c.stmts.append(f"{h}' = {rng.choice(['relu', 'tanh'])}({u} * {h} + {c.free(shape, 1)})")
        c.output(f"{h}'")
        return [(f"{h}'", shape)]
    if kind == "diag_tanh":
        h = c.state(shape, "h")
        c.stmts.append(f"{h}' = {c.gate(shape)} * tanh({h}) + {c.bounded(shape)}")
        c.output(f"{h}'")
        return [(f"{h}'", shape)]
    if kind == "lstm":
        h, cc = c.state(shape, "h"), c.state(shape, "c")
        W = c.param((f"4*{d}", D))
        R = c.param((f"4*{d}", d))
        x = c.input((D,))
        names = [c.fresh(p) for p in ("i", "f", "g", "o")]
        c.stmts.append(f"{', '.join(names)} = split({W} @ {x} + {R} @ {h}, 4)")
        i, f, g, o = names
        c.stmts.append(f"{cc}' = sigmoid({f}) * {cc} + sigmoid({i}) * tanh({g})")
        c.stmts.append(f"{h}' = sigmoid({o}) * tanh({cc}')")
        c.output(rng.choice([f"{h}'", f"{cc}'"]))
        return [(f"{h}'", shape)]
    # gru
    h = c.state(shape, "h")
    W = c.param((f"3*{d}", D))
    R = c.param((f"2*{d}", d))
    U = c.param((d, d))
    x = c.input((D,))
    xr, xz, xn = (c.fresh(p) for p in ("xr", "xz", "xn"))
    hr, hz = c.fresh("hr"), c.fresh("hz")
    c.stmts.append(f"{xr}, {xz}, {xn} = split({W} @ {x}, 3)")
    c.stmts.append(f"{hr}, {hz} = split({R} @ {h}, 2)")
    r, z = c.local(f"sigmoid({xr} + {hr})", "r"), c.local(f"sigmoid({xz} + {hz})", "z")
    n = c.local(f"tanh({xn} + {r} * ({U} @ {h}))", "n")
    c.stmts.append(f"{h}' = (1 - {z}) * {n} + {z} * {h}")
    c.output(f"{h}'")
    return [(f"{h}'", shape)]


# (motif, weight, states it adds)
MOTIFS = [
    (m_diag, 4, 1), (m_matrix, 4, 1), (m_semiring, 3, 3), (m_delta, 3, 1), (m_block, 2, 2),
    (m_dense, 2, 1), (m_nonlinear, 3, 2), (m_hoisted, 1, 1), (m_mamba, 2, 1),
]


def generate(rng: random.Random, name: str = "Fuzz") -> str:
    """The source text of one random well-typed cell with 1 to 3 (occasionally 4) states."""
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
        c.output(e if not shape or rng.random() < 0.5 else f"tanh({e})")
    return render(c)


def render(c: _Cell) -> str:
    args = [d for d in c.dims if d not in c.dim_defaults] + [f"{d}={v}" for d, v in c.dim_defaults.items()]
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
