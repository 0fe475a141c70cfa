"""The torch meaning of every IR op: IR node -> one torch expression (text). Shared by the
backends that emit torch code and by the analysis's numeric checks.

Convention: every tensor carries the same number of leading "prefix" axes (batch, heads,
...; params carry 1s there) followed by the node's own axes, so per-node rules can
address node axes from the right (`...` first) and never need to know the prefix."""
from __future__ import annotations

from .ir import COMPARE, Node, Op

UNARY_TORCH = {
    Op.EXP: "torch.exp", Op.LOG: "torch.log", Op.LOG1P: "torch.log1p", Op.EXPM1: "torch.expm1",
    Op.SIGMOID: "torch.sigmoid", Op.LOGSIGMOID: "F.logsigmoid", Op.TANH: "torch.tanh",
    Op.SOFTPLUS: "F.softplus", Op.RELU: "torch.relu", Op.SILU: "F.silu", Op.GELU: "F.gelu", Op.ELU: "F.elu",
    Op.ABS: "torch.abs", Op.SIGN: "torch.sign", Op.SQRT: "torch.sqrt", Op.RSQRT: "torch.rsqrt",
    Op.SIN: "torch.sin", Op.COS: "torch.cos",
}
INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.POW: "**", Op.LT: "<", Op.LE: "<=",
         Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!="}
FUNC2 = {Op.MAX: "torch.maximum", Op.MIN: "torch.minimum", Op.LOGADDEXP: "torch.logaddexp"}
REDUCE = {Op.SUM: "torch.sum", Op.AMAX: "torch.amax", Op.LOGSUMEXP: "torch.logsumexp"}


def index_text(items) -> str:
    def one(i):
        if i is None:
            return "None"
        if isinstance(i, slice):
            if i.start is None and i.stop is None:
                return ":"
            return f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
        return str(int(i))
    return "[..., " + ", ".join(one(i) for i in items) + "]"


def const_text(node: Node) -> str:
    """A scalar constant as a Python literal (repr of a float is always valid Python)."""
    v = float(node.arg)
    if v != v or v in (float("inf"), float("-inf")):
        return f"float({str(v)!r})"
    return repr(v)


class SourceNotes:
    """The comment generated code carries on each line: `file:line`, plus the .rec line's
    text the first time it appears (reduced to printable ASCII, so it can never end the
    comment or smuggle code into the generated text)."""

    def __init__(self, ir):
        span = ir.checked.span
        # the file name is the user's too: reduced like source text (no newline can end the comment)
        self.file = safe_comment(span.file.rsplit("/", 1)[-1]).replace("*/", "*_") if span else "<cell>"
        self.shown: set[int] = set()

    def header(self, ir, backend: str) -> str:
        return f"# recdsl {backend} backend -- cell {ir.name} ({self.file}), dims " + \
            ", ".join(f"{k}={v}" for k, v in ir.dims.items())

    def __call__(self, n: Node | None, with_text: bool = True) -> str:
        if n is None or n.span is None:
            return ""
        text = f"{self.file}:{n.span.line}"
        if with_text and n.span.line not in self.shown and n.span.source is not None:
            self.shown.add(n.span.line)
            text += "  " + safe_comment(n.span.source.line(n.span.line))
        return text


def safe_comment(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text).strip()


# ---------------------------------------------------------------------------- names in generated code
# A user may name a value anything the checker accepts (any identifier but Python keywords,
# dunders and .rec words), so generated code never uses a user name bare, and never joins
# it with a suffix (`{state}_next` and `p_{param}` both gave `p_next`). Every identifier an
# emitter writes is one of:
#
#   user_name(role, name)       `<role>_<name>`           in_x, p_W, s_h, next_h
#                               (a complex state's part h.re: s___re_h, see user_name)
#   temp_name(kind, k, hint)    `<kind><k>` or `<kind><k>_<hint>`   t3, t7_f, seq12_h, fused4_final
#   a fixed helper              inputs, initial, states, params, step_params, seq_params,
#                               prefix_rank, seq_prefix_rank, dtype, device, first_input,
#                               reverse, cu_seqlens, ran, scans, launch, stage_kernels,
#                               fused_loop, fused_loops, newton, newton_stages, seq_rt,
#                               torch_rt, leaves, torch, F, step, forward, ...
#
# Roles and kinds are lowercase letters only; k is a number the emitter hands out once
# (a counter, or a node's position), so one k never names two values; a hint (the user
# name the value computes, or a fixed word) is only there for the reader. Split a name at
# its first `_`: the head is a role (no digit) or a kind and its number (ends in a digit),
# so the two families never meet, and within them (role, user name) or k is unique. A
# helper is never a user value either: without `_` it is a word of lowercase letters with
# no digit (or `F`), which no temporary is (they end in a digit) and no user value's name
# is (it always has a `_`); with `_` its head is a word that is no role (the roles: in, p,
# s, next) and no kind with a number (no digit), so it is none of the forms above. The
# Triton kernels and the C loop name their values by number only (v3, x0, row_in_1): no
# user name reaches them (a kernel's own name, `<cell>_stage<i>_<states>_fwd`,
# shows its states to the reader and is unique by i). tests/pipeline/test_name_hygiene.py
# renames the users' names of every stdlib cell against the names emitters actually write.

def user_name(role: str, name: str) -> str:
    """The generated name of the user's value `name` in `role` (the only way a user name
    becomes an identifier of generated code). A part of a complex state, `h.re` (recdsl.ir),
    is `<role>___re_h`: after `<role>_` comes `__re_h`, which no user name can be (the
    checker refuses names that start with `__`), and the part comes first, so that
    (name, part) -> identifier is one to one."""
    assert role.isalpha() and role.islower(), role
    if "." in name:
        base, part = name.rsplit(".", 1)
        return f"{role}___{part}_{base}"
    return f"{role}_{name}"


def temp_name(kind: str, k: int, hint: str | None = None) -> str:
    """A temporary numbered k (unique in the generated function); hint, if an identifier,
    shows the reader which value it is."""
    assert kind.isalpha() and kind.islower(), kind
    return f"{kind}{k}_{hint}" if hint and hint.isidentifier() else f"{kind}{k}"


class Temps:
    """Hands out temporaries' names: one counter for every kind, so no number repeats."""

    def __init__(self):
        self.count = 0

    def __call__(self, kind: str, hint: str | None = None) -> str:
        self.count += 1
        return temp_name(kind, self.count, hint)


class TorchExpr:
    """Emits the right-hand side for a node given the names of its sources."""

    def __init__(self, name_of, nb: str = "prefix_rank", raw_param=None, const_tensor=None, rt: str = "torch_rt"):
        self.name_of = name_of  # Node -> the Python expression holding its value
        self.nb = nb            # the name of the prefix rank in the generated code
        self.rt = rt            # the name of the runtime helpers' module in the generated code
        self.nb_read = False    # some expression read it (a driver defines it only then)
        self.raw_param = raw_param  # PARAM node -> its unprefixed tensor's name (one GEMM for W @ x)
        # scalar CONST -> the name of a tensor holding it, made once outside a per-step function
        # (None: the tensor is built where it is used)
        self.const_tensor = const_tensor

    def prefix_rank(self) -> str:
        self.nb_read = True
        return self.nb

    def operand(self, src: Node, rank: int, as_tensor: bool = False) -> str:
        """src's value lifted to `rank` node axes (new axes right after the prefix)."""
        if src.op == Op.CONST and not src.shape:
            if as_tensor and self.const_tensor is not None:
                return self.const_tensor(src)
            text = const_text(src)
            return f"torch.tensor({text}, dtype=dtype, device=device)" if as_tensor else text
        text = self.name_of(src)
        if src.is_bool and not as_tensor:
            text = f"{text}.to(dtype)"
        k = rank - src.rank
        if k > 0:
            text = f"{text}[..., {', '.join(['None'] * k + [':'] * src.rank)}]"
        return text

    def deps(self, n: Node) -> tuple[Node, ...]:
        """The nodes whose values the emitted expression reads (fewer than n.srcs when a
        fused form skips intermediate values)."""
        lin = self.linear_parts(n)
        if lin is not None:
            return (lin[1],)
        if n.op == Op.MATMUL and n.srcs[1].rank == 1 and self.is_param_matrix(n.srcs[0]):
            return (n.srcs[1],)   # the param (or its slice) is read as stored
        return n.srcs

    def linear_parts(self, n: Node):
        """n == W @ x + b1 + b2 + ... with W a matrix param and b's vector params: one
        F.linear instead of a matmul and adds. Returns (W, x, [b...]) or None."""
        if self.raw_param is None or n.op != Op.ADD:
            return None
        leaves, stack = [], [n]
        while stack:
            m = stack.pop()
            if m.op == Op.ADD and m is not n and m.name is not None:
                return None  # an intermediate with a name may be used elsewhere; keep it
            if m.op == Op.ADD:
                stack.extend(m.srcs)
            else:
                leaves.append(m)
        mms = [m for m in leaves if m.op == Op.MATMUL and self.is_param_matrix(m.srcs[0]) and m.srcs[1].rank == 1]
        biases = [m for m in leaves if m.op == Op.PARAM and m.rank == 1]
        if len(mms) != 1 or len(biases) + 1 != len(leaves) or any(b.shape != n.shape for b in biases):
            return None
        return mms[0].srcs[0], mms[0].srcs[1], biases

    def is_param_matrix(self, n: Node) -> bool:
        """n is a matrix param, or a slice of one (`W[:, 0:D]`, what the analysis makes of
        `W @ concat(x, h)`): the left side of one GEMM over all rows, read as stored."""
        if self.raw_param is None or n.rank != 2:
            return False
        return n.op == Op.PARAM or (n.op == Op.INDEX and n.srcs[0].op == Op.PARAM and n.srcs[0].rank == 2
                                    and all(isinstance(i, slice) for i in n.arg))

    def param_matrix(self, n: Node) -> str:
        """The text of an is_param_matrix value: the param as stored (sliced)."""
        return self.raw_param(n) if n.op == Op.PARAM else self.raw_param(n.srcs[0]) + index_text(n.arg)

    def __call__(self, n: Node) -> str:
        op, s = n.op, n.srcs
        lin = self.linear_parts(n)
        if lin is not None:
            W, x, bs = lin
            biases = ", ".join(self.raw_param(b) for b in bs)
            return f"{self.rt}.param_linear({self.param_matrix(W)}, {self.name_of(x)}, {biases})"
        if op in UNARY_TORCH:   # torch.cos(1.0) is a TypeError: a bare constant goes in as a tensor
            bare = s[0].op == Op.CONST and not s[0].shape
            return f"{UNARY_TORCH[op]}({self.operand(s[0], n.rank, as_tensor=bare)})"
        if op == Op.NEG:
            return f"-{self.operand(s[0], n.rank)}"
        if op in INFIX:
            if op in COMPARE:
                return f"({self.operand(s[0], n.rank)} {INFIX[op]} {self.operand(s[1], n.rank)})"
            a, b = self.operand(s[0], n.rank), self.operand(s[1], n.rank)
            return f"({a} {INFIX[op]} {b})"
        if op in FUNC2:
            return f"{FUNC2[op]}({self.operand(s[0], n.rank, True)}, {self.operand(s[1], n.rank, True)})"
        if op == Op.WHERE:
            c = self.operand(s[0], n.rank, True)
            return f"torch.where({c}, {self.operand(s[1], n.rank, True)}, {self.operand(s[2], n.rank, True)})"
        if op == Op.MATMUL and s[1].rank == 1 and self.is_param_matrix(s[0]):
            return f"{self.rt}.param_matvec({self.param_matrix(s[0])}, {self.name_of(s[1])})"
        if op == Op.MATMUL:
            a, b = self.name_of(s[0]), self.name_of(s[1])
            if s[0].rank == 2 and s[1].rank == 1:
                return f"({a} @ {b}[..., None])[..., 0]"
            if s[0].rank == 1 and s[1].rank == 2:
                return f"({a}[..., None, :] @ {b})[..., 0, :]"
            return f"({a} @ {b})"
        if op == Op.OUTER:
            return f"({self.name_of(s[0])}[..., :, None] * {self.name_of(s[1])}[..., None, :])"
        if op == Op.DOT:
            return f"({self.name_of(s[0])} * {self.name_of(s[1])}).sum(-1)"
        if op in REDUCE:
            axis, keep = n.arg
            r = s[0].rank
            dims = tuple(range(-r, 0)) if axis is None else (axis - r,)
            return f"{REDUCE[op]}({self.name_of(s[0])}, dim={dims}, keepdim={keep})"
        if op == Op.INDEX:
            return self.name_of(s[0]) + index_text(n.arg)
        if op == Op.EXPAND:
            src = self.operand(s[0], s[0].rank, as_tensor=True)
            if s[0].op == Op.CONST and not s[0].shape:  # a bare constant has no prefix axes yet
                src = f"{self.rt}.with_prefix({src}, {self.prefix_rank()})"
            return f"{self.rt}.expand_to({src}, {s[0].rank}, {tuple(n.arg)!r})"
        if op == Op.TRANSPOSE:
            return f"{self.name_of(s[0])}.transpose(-1, -2)"
        if op == Op.RESHAPE:
            x, r = self.name_of(s[0]), s[0].rank
            head = f"{x}.shape[:-{r}]" if r else f"{x}.shape"
            return f"{x}.reshape({head} + {tuple(n.arg)!r})"
        if op == Op.CONCAT:
            parts = ", ".join(self.name_of(x) for x in s)
            return f"torch.cat({self.rt}.broadcast_prefix([{parts}], {self.prefix_rank()}), dim=-1)"
        if op == Op.EYE:
            size = n.arg if n.arg is not None else None
            return f"{self.rt}.with_prefix(torch.eye({size}, dtype=dtype, device=device), {self.prefix_rank()})"
        if op == Op.CONST:
            value = f"torch.tensor({list(n.arg)!r}, dtype=dtype, device=device)"
            return f"{self.rt}.with_prefix({value}, {self.prefix_rank()})"
        if op == Op.INV:    # params and constants only: the prefix axes are 1s, computed once
            return f"torch.linalg.inv({self.name_of(s[0])})"
        if op == Op.EXPM:
            return f"torch.linalg.matrix_exp({self.name_of(s[0])})"
        if op == Op.SOLVE:
            a, b = self.name_of(s[0]), self.name_of(s[1])
            if s[1].rank == 1:
                return f"torch.linalg.solve({a}, {b}[..., None])[..., 0]"
            return f"torch.linalg.solve({a}, {b})"
        raise NotImplementedError(f"no torch form for {op.name}")


def live_nodes(nodes: list[Node], roots: list[Node], deps) -> list[Node]:
    """The nodes (of `nodes`, in their order) whose values the roots need, reading each
    node's sources through deps(node) -- TorchExpr.deps, so a value a fused form absorbs
    (W @ x inside F.linear(x, W, b)) is not needed. An emitter writes only these: a value
    nothing reads is a wasted computation (a matmul every step)."""
    among = {n.id for n in nodes}
    need: set[int] = set()
    stack = [r for r in roots if r.id in among]
    while stack:
        n = stack.pop()
        if n.id in need:
            continue
        need.add(n.id)
        stack.extend(s for s in deps(n) if s.id in among and s.id not in need)
    return [n for n in nodes if n.id in need]


def compile_nodes(roots: list[Node], leaves: list[Node]):
    """A function f(values: list of tensors for `leaves`, prefix_rank, dtype, device) -> list of tensors for
    `roots`, generated from the IR with the same emitter as the backends (nodes_source)."""
    import torch
    import torch.nn.functional as F

    from . import torch_rt as rt
    ns = {"torch": torch, "F": F, "torch_rt": rt}
    exec(compile(nodes_source(roots, leaves), "<recdsl nodes>", "exec"), ns)
    return ns["f"]


def nodes_source(roots: list[Node], leaves: list[Node]) -> str:
    """The text of compile_nodes' function: the roots' values from the leaves', computing
    only what the roots need (sources first)."""
    names: dict[int, str] = {n.id: f"leaves[{i}]" for i, n in enumerate(leaves)}
    expr = TorchExpr(lambda n: names[n.id])
    lines = ["def f(leaves, prefix_rank, dtype, device):"]
    order, seen, stack = [], set(names), [(r, False) for r in reversed(roots)]
    while stack:  # sources first, not below the given leaves
        n, done = stack.pop()
        if done:
            order.append(n)
        elif n.id not in seen:
            seen.add(n.id)
            stack.append((n, True))
            stack.extend((x, False) for x in reversed(n.srcs) if x.id not in seen)
    for n in order:
        if n.id in names:
            continue
        if n.op == Op.CONST and not n.shape:
            names[n.id] = expr.operand(n, 0)
            continue
        if n.op in (Op.INPUT, Op.PARAM, Op.STATE):
            raise ValueError(f"leaf {n!r} has no value")
        names[n.id] = temp_name("t", n.id)
        lines.append(f"    {names[n.id]} = {expr(n)}")
    lines.append("    return [" + ", ".join(names[r.id] if r.id in names else "None" for r in roots) + "]")
    return "\n".join(lines) + "\n"
