"""Plan -> the newton backend's forward (`recdsl inspect --stage newton`): the torch
backend's forward (its Emitter: hoisted values over B*T, the borrowed kernels of linear and
vectorised stages) with each parallel-Newton stage emitted as two functions of one step,
evaluated over all B*T steps at once, and one call to the solver (solve.py):

    core<k>(ins, st, params, step_params)  -> the new states f(h_{t-1}, x_t)       (the torch loop's step)
    jac<k>(ins, st, params, step_params)   -> (f_1..f_k, J_11, J_12, .., J_kk)      J_ij = d f_i / d h_j, per element

`jac` is derived from the IR: a forward-mode pass through the step's ops, one unit tangent
per state (`torch.ones_like(h_j)`), each op's derivative rule written below. Because the
analysis proved the Jacobian diagonal (or k x k per element), the tangent of f_i seeded on
h_j is exactly the diagonal of d f_i / d h_j (off-diagonal entries are zero), not the row
sums a dense Jacobian would give."""
from __future__ import annotations

from recdsl.ir import COMPARE, Node, Op, toposort
from recdsl.lowering import Choice
from recdsl.torch_expr import TorchExpr

from ..torch.codegen import Emitter, _StepFunction

# d op(a) / d a, as text of (a: the lifted primal operand, y: the node's value).
UNARY_RULES = {
    Op.EXP: "{y}", Op.LOG: "1.0 / {a}", Op.LOG1P: "1.0 / (1.0 + {a})", Op.EXPM1: "({y} + 1.0)",
    Op.SIGMOID: "({y} * (1.0 - {y}))", Op.LOGSIGMOID: "torch.sigmoid(-{a})", Op.TANH: "(1.0 - {y} * {y})",
    Op.SOFTPLUS: "torch.sigmoid({a})", Op.RELU: "({a} > 0)",
    Op.SILU: "(torch.sigmoid({a}) * (1.0 + {a} * (1.0 - torch.sigmoid({a}))))",
    Op.GELU: "(0.5 * (1.0 + torch.erf({a} * 0.7071067811865476)) + {a} * torch.exp(-0.5 * {a} * {a}) "
             "* 0.3989422804014327)",
    Op.ELU: "torch.where({a} > 0, 1.0, {y} + 1.0)", Op.ABS: "torch.sign({a})", Op.SQRT: "(0.5 / {y})",
    Op.RSQRT: "(-0.5 * {y} * {y} * {y})", Op.SIN: "torch.cos({a})", Op.COS: "(-torch.sin({a}))",
}
ZERO = COMPARE | {Op.SIGN}                                  # piecewise constant: no tangent
SUBSTITUTE = {Op.INDEX, Op.TRANSPOSE, Op.RESHAPE, Op.SUM, Op.EXPAND, Op.CONCAT}   # linear: the op on the tangent
BILINEAR = {Op.MATMUL, Op.OUTER, Op.DOT}                    # one term per differentiated operand
SUPPORTED = set(UNARY_RULES) | ZERO | SUBSTITUTE | BILINEAR | {
    Op.NEG, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAX, Op.MIN, Op.LOGADDEXP, Op.WHERE,
    Op.STATE, Op.INPUT, Op.PARAM, Op.CONST, Op.EYE}


def unsupported(core) -> Node | None:
    """The first op of the step the forward-mode pass has no rule for (None: all have one)."""
    return next((n for n in core if n.op not in SUPPORTED), None)


class NewtonEmitter(Emitter):
    BACKEND = "newton"

    def __init__(self, ir, plan, selection):
        super().__init__(ir, plan, selection)
        self.newton_stages: list[dict] = []   # per Newton stage: index, states (what solve.py reports)

    def stage_method(self, choice: Choice):
        """The newton backend's own kernel is this class's method; a torch one only where the
        registry entry says it is borrowed."""
        if choice.kernel.borrowed != "torch" and choice.kernel.emit not in type(self).__dict__:
            raise AssertionError(f"{choice.kernel.name} has no newton emitter")   # a registry bug
        return getattr(self, choice.kernel.emit)

    def _stage_newton(self, choice: Choice):
        states, core = list(choice.states), list(choice.form.core)
        fn = _StepFunction(self, states, core)     # binds the per-step inputs the step reads
        once, body, returns = fn.build()
        tan = _Tangents(self, fn, states, core, body)
        jbody, jreturns = tan.build()
        for code, n in once + tan.once:
            self.emit(code, n)
        cname, jname = self.fresh("core"), self.fresh("jac")
        head = [f"{', '.join(nm for nm, _ in fn.pre)}, = ins"] if fn.pre else []
        unpack = f"{', '.join(fn.svar[s] for s in states)}, = st"
        for name, lines, rets in ((cname, body, returns), (jname, jbody, jreturns)):
            self.emit(f"def {name}(ins, st, params, step_params):")
            for code in head + [unpack]:
                self.emit(code, indent=2)
            for code, n in lines:
                self.emit(code, n, indent=2)
            self.emit(f"return ({', '.join(rets)},)", indent=2)
        k = len(self.newton_stages)
        self.newton_stages.append({"stage": choice.stage, "states": tuple(states)})
        seqs = self.fresh("seqs")
        params = ", ".join(f"{p!r}: params[{p!r}]" for p in fn.params)
        self.header_reads.add("first_input")
        ins = ", ".join(seq for _, seq in fn.pre)
        h0s = ", ".join(f"initial[{s!r}]" for s in states)
        self.emit(f"{seqs} = newton.solve(newton_stages[{k}], {cname}, {jname}, [{ins}], [{h0s}], {{{params}}}, "
                  "first_input.shape[:2])",
                  self.ir.updates[states[0]])
        for i, s in enumerate(states):
            nm = self.fresh("seq", s)
            self.emit(f"{nm} = {seqs}[{i}]")
            self.seq[self.ir.updates[s].id] = nm


class _Tangents:
    """The forward-mode pass of a step (see the module docstring): for each state h_j, the
    tangent of every value of the step w.r.t. h_j, from each op's rule."""

    def __init__(self, em: NewtonEmitter, fn: _StepFunction, states: list[str], core: list[Node], body: list):
        self.em, self.fn, self.states, self.body = em, fn, states, body
        self.core_ids = {n.id for n in core}
        self.roots = [em.ir.updates[s] for s in states]
        self.order = [n for n in toposort(self.roots) if n.id in self.core_ids]
        self.once: list = []
        self.lines: list = []

    def primal(self, n: Node) -> str:
        return self.fn.name(n)

    def build(self):
        fn, em = self.fn, self.em
        # the core values the primal step did not compute (absorbed into a fused expression)
        for n in self.order:
            if n.id not in fn.step and not (n.op == Op.CONST and not n.shape) and n.op != Op.STATE:
                nm = em.fresh("t", n.name)
                self.lines.append((f"{nm} = {fn.expr(n)}", n))
                fn.step[n.id] = nm
        primal_lines = list(self.body)   # the primal step's lines (core's): jac is one pass, values and tangents
        rets_f = [self.primal(u) for u in self.roots]
        jac = []
        for j, s in enumerate(self.states):
            tan: dict[int, str] = {}
            one = em.fresh("one", s)
            self.lines.append((f"{one} = torch.ones_like({fn.svar[s]})", None))
            tan[em.ir.states[s].id] = one
            for n in self.order:
                if n.op in (Op.STATE, Op.CONST, Op.EYE) or n.id in tan:
                    continue
                text = self.rule(n, tan)
                if text is None:
                    continue
                if text.isidentifier():   # the tangent of its one differentiated source: the same value
                    tan[n.id] = text
                    continue
                nm = em.fresh("d", n.name)
                self.lines.append((f"{nm} = {text}", n))
                tan[n.id] = nm
            jac.append([tan.get(u.id) for u in self.roots])
        rets = rets_f + [("None" if jac[j][i] is None else f"{jac[j][i]}.expand_as({rets_f[i]})")
                         for i in range(len(self.states)) for j in range(len(self.states))]
        return primal_lines + self.lines, rets

    # ---------------------------------------------------------------- derivative rules
    def rule(self, n: Node, tan: dict) -> str | None:
        s = n.srcs
        d = [tan.get(x.id) for x in s]
        if all(t is None for t in d) or n.op in ZERO:
            return None
        fn = self.fn
        r = n.rank

        def P(x):      # the primal operand lifted to n's rank
            return fn.expr.operand(x, r, as_tensor=False)

        def D(i):      # the tangent of source i lifted to n's rank
            return _lift(d[i], r - s[i].rank, s[i].rank)

        y = self.primal(n)
        op = n.op
        if op in UNARY_RULES:
            return f"({D(0)} * {UNARY_RULES[op].format(a=P(s[0]), y=y)})"
        if op == Op.NEG:
            return f"(-{D(0)})"
        if op in (Op.ADD, Op.SUB):
            if d[0] is None:
                return f"(-{D(1)})" if op == Op.SUB else D(1)
            if d[1] is None:
                return D(0)
            return f"({D(0)} {'+' if op == Op.ADD else '-'} {D(1)})"
        if op == Op.MUL:
            terms = ([f"{D(0)} * {P(s[1])}"] if d[0] else []) + ([f"{P(s[0])} * {D(1)}"] if d[1] else [])
            return "(" + " + ".join(terms) + ")"
        if op == Op.DIV:
            if d[1] is None:
                return f"({D(0)} / {P(s[1])})"
            num = f"{D(0)} - {y} * {D(1)}" if d[0] else f"-{y} * {D(1)}"
            return f"(({num}) / {P(s[1])})"
        if op == Op.POW:
            terms = []
            if d[0]:
                terms.append(f"{D(0)} * {P(s[1])} * {fn.expr.operand(s[0], r, as_tensor=True)} ** ({P(s[1])} - 1.0)")
            if d[1]:
                terms.append(f"{D(1)} * {y} * torch.log({fn.expr.operand(s[0], r, as_tensor=True)})")
            return "(" + " + ".join(terms) + ")"
        if op in (Op.MAX, Op.MIN):
            cmp = ">=" if op == Op.MAX else "<="
            a, b = fn.expr.operand(s[0], r, True), fn.expr.operand(s[1], r, True)
            return f"torch.where({a} {cmp} {b}, {D(0) if d[0] else 0.0}, {D(1) if d[1] else 0.0})"
        if op == Op.LOGADDEXP:
            a, b = P(s[0]), P(s[1])
            terms = ([f"{D(0)} * torch.sigmoid({a} - {b})"] if d[0] else []) + \
                    ([f"{D(1)} * torch.sigmoid({b} - {a})"] if d[1] else [])
            return "(" + " + ".join(terms) + ")"
        if op == Op.WHERE:
            c = fn.expr.operand(s[0], r, True)
            return f"torch.where({c}.bool(), {_lift(d[1], r - s[1].rank, s[1].rank) if d[1] else 0.0}, " \
                   f"{_lift(d[2], r - s[2].rank, s[2].rank) if d[2] else 0.0})"
        if op in SUBSTITUTE:   # linear in its sources: the same op on the tangents (zeros where none)
            zeros = {x.id: f"torch.zeros_like({fn.expr.operand(x, x.rank, True)})" for x, t in zip(s, d) if t is None}
            sub = TorchExpr(lambda x: tan.get(x.id) or zeros.get(x.id) or fn.name(x), raw_param=fn.raw,
                            const_tensor=fn.const_tensor, rt=fn.expr.rt)
            return sub(n)
        if op in BILINEAR:   # d(a . b) = da . b + a . db
            terms = []
            for i, x in enumerate(s):
                if d[i] is None:
                    continue
                sub = TorchExpr(lambda z, x=x: tan[z.id] if z is x else fn.name(z), raw_param=fn.raw,
                                const_tensor=fn.const_tensor, rt=fn.expr.rt)
                terms.append(sub(n))
            return "(" + " + ".join(terms) + ")"
        raise AssertionError(f"no forward-mode rule for {op.name}")   # refused by kernels.py before emitting


def _lift(name: str, k: int, rank: int) -> str:
    """A tangent of `rank` node axes lifted by k axes right after the prefix (as
    TorchExpr.operand lifts a primal operand)."""
    if k <= 0:
        return name
    return f"{name}[..., {', '.join(['None'] * k + [':'] * rank)}]"
