"""No dead code: every value a generated program computes is read by something.

For every stdlib cell, every text each backend generates for it is checked:

  * reference   the per-step Python `step` (backends/reference); for a grid or DAG cell,
                the program it evaluates each node with (torch_expr.nodes_source);
  * torch       the Python `forward`, with its per-step `core` of a torch loop;
  * torch C     the C of the torch backend's fused loops (backends/torch/fused_loop.py);
  * triton      the Python driver, and the Triton kernel module (forward and backward
                kernels), where the triton backend runs the cell.

A dead value is wasted work (the torch loop once computed W @ h beside the F.linear that
absorbed it: a matmul every step for nothing), so the test names each one with its line.

Python (the `ast` module), per function scope (a nested `def` is its own scope; the names
it reads count as reads of its enclosing scope, so a closure keeps its captures alive):

  * roots are statements with an effect: expression statements (`ran.append(...)`,
    `tl.store(...)`), `return`, the tests of `if`/`while`, the iterables of `for`;
  * a name is live if a live statement reads it; an assignment is live if one of its
    targets is live (a least fixpoint: `acc = acc * a` does not keep itself alive, and a
    value read only by dead values is dead too);
  * every assignment that is not live is dead;
  * tuple unpacking: `a, b = f(...)` unpacks the several results of ONE call, which runs
    whole whatever is read, so a live call may leave some of its results unread (a scan
    that returns states, finals, outputs); `a, b = ins` unpacks a bundle of values that
    were each computed for this function, so every target must be read (an unread one is
    a value computed elsewhere for nothing) -- or be `_`, which says the value is not read;
  * parameters and `for` targets are not checked (the loop runs for its effects).

C (text, comments stripped), per function: a declaration `TYPE [*][restrict] name =
expr;` (one statement on its line, declarators split at top-level commas) is live if its
name is read by a live declaration or by any other code (stores, calls, control flow);
every other declaration is dead.

And no repeated setup: the torch loop's per-step function (`core`, run once per step by
backends/torch/seq_rt.run_loop) builds no constant tensor -- constants are made once per
forward, outside it -- and run_loop builds the params' views once per loop, not per step."""
from __future__ import annotations

import ast
import functools
import re

import pytest
import torch

import recdsl
from helpers import compare_backends
from recdsl.backends import reference
from recdsl.backends.torch import seq_rt
from recdsl.ir import Op
from recdsl.pipeline import backend_module, plan_cell
from recdsl.spec import stdlib_files
from recdsl.torch_expr import nodes_source

CELLS = sorted(stdlib_files())


# ---------------------------------------------------------------------------- Python

def _loads(node: ast.AST) -> set[str]:
    """Every name node reads (nested functions included: their free names are captures)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _target_names(t: ast.AST) -> list[str]:
    if isinstance(t, ast.Name):
        return [t.id]
    if isinstance(t, (ast.Tuple, ast.List)):
        return [n for e in t.elts for n in _target_names(e)]
    if isinstance(t, ast.Starred):
        return _target_names(t.value)
    return []          # a subscript or attribute store writes into a live object: an effect


class _Stmt:
    """One statement of a scope: the names it binds, the names it reads, whether it has an
    effect of its own (a root), and (for a bundle unpack) the targets that must all be read."""

    def __init__(self, node, targets, reads, root, every=()):
        self.node, self.targets, self.reads, self.root, self.every = node, targets, reads, root, every


def _flatten(body: list[ast.stmt]) -> list[_Stmt]:
    """The statements of one function scope; control flow is looked through (its tests and
    iterables are roots), a nested def is one statement binding its name."""
    out = []
    for s in body:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(_Stmt(s, [s.name], _loads(s), False))   # (its decorators' and body's reads)
        elif isinstance(s, ast.Assign):
            targets = [n for t in s.targets for n in _target_names(t)]
            effect = any(not isinstance(t, (ast.Name, ast.Tuple, ast.List)) for t in s.targets)
            bundle = isinstance(s.value, (ast.Name, ast.Tuple, ast.List)) and \
                any(isinstance(t, (ast.Tuple, ast.List)) for t in s.targets)
            reads = _loads(s.value) | {n for t in s.targets for n in _loads(t)}
            out.append(_Stmt(s, targets, reads, effect or not targets, targets if bundle else ()))
        elif isinstance(s, (ast.AugAssign, ast.AnnAssign)):
            targets = _target_names(s.target)
            out.append(_Stmt(s, targets, _loads(s), not targets))
        elif isinstance(s, (ast.If, ast.While)):
            out.append(_Stmt(s, [], _loads(s.test), True))
            out += _flatten(s.body) + _flatten(s.orelse)
        elif isinstance(s, ast.For):
            out.append(_Stmt(s, [], _loads(s.iter), True))
            out += _flatten(s.body) + _flatten(s.orelse)
        elif isinstance(s, ast.With):
            out.append(_Stmt(s, [], {n for i in s.items for n in _loads(i)}, True))
            out += _flatten(s.body)
        elif isinstance(s, ast.Try):
            out += _flatten(s.body) + [x for h in s.handlers for x in _flatten(h.body)] + \
                _flatten(s.orelse) + _flatten(s.finalbody)
        else:   # expression statements, return, assert, raise, pass, import: effects (or nothing)
            out.append(_Stmt(s, [], _loads(s), True))
    return out


def _dead_in_scope(stmts: list[_Stmt]) -> list[tuple[ast.AST, str]]:
    """(statement, name) of every dead binding of one scope (the mark phase of a
    mark-and-sweep from the roots)."""
    live_names: set[str] = set()
    live = [s.root for s in stmts]
    changed = True
    while changed:
        changed = False
        for i, s in enumerate(stmts):
            if not live[i] and any(t in live_names for t in s.targets):
                live[i] = changed = True
            if live[i] and not s.reads <= live_names:
                live_names |= s.reads
                changed = True
    dead = []
    for s, ok in zip(stmts, live):
        if not ok and s.targets:
            dead += [(s.node, t) for t in s.targets if t != "_"]
        elif ok and s.every:
            dead += [(s.node, t) for t in s.every if t not in live_names and t != "_"]
    return dead


def dead_python(text: str) -> list[str]:
    """`function: 'name' never read: line` for every dead binding of a Python text."""
    tree = ast.parse(text)
    lines = text.splitlines()
    found = []
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node, name in _dead_in_scope(_flatten(f.body)):
                found.append(f"{f.name}: {name!r} never read: {lines[node.lineno - 1].strip()}")
    return found


# ---------------------------------------------------------------------------- C

_C_COMMENT = re.compile(r"/\*[\s\S]*?\*/|//[^\n]*")
_C_DECL = re.compile(r"^\s*(?:const\s+)?[A-Za-z_]\w*(?:\s*\*)?\s+(?:restrict\s+)?(?=[A-Za-z_]\w*\s*=[^=])([^;]*);\s*$")
_C_NAME = re.compile(r"[A-Za-z_]\w*")
_C_FUNC = re.compile(r"^[A-Za-z_][^;{}]*\)\s*\{\s*$")


def _split_top(text: str) -> list[str]:
    """text split at commas outside parentheses and brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _c_functions(text: str) -> dict[str, list[str]]:
    """name -> the lines of each function of a C text (a header at column 0 ending in `{`);
    the lines outside functions are one more group, ""."""
    groups: dict[str, list[str]] = {"": []}
    cur = ""
    for ln in text.splitlines():
        if _C_FUNC.match(ln):
            cur = re.search(r"(\w+)\s*\(", ln).group(1)
            groups[cur] = []
        groups[cur].append(ln)
        if ln.startswith("}"):
            cur = ""
    return groups


def _dead_in_c_function(name: str, lines: list[str]) -> list[str]:
    """`function: 'name' never read: line` for every dead declaration of one C function."""
    decls: list[tuple[str, set[str], str]] = []     # (variable, names its initialiser reads, line)
    other: set[str] = set()                         # names read by code that is not a declaration
    for ln in lines:
        m = _C_DECL.match(ln)
        parts = [p.split("=", 1) for p in _split_top(m.group(1))] if m else []
        if m and all(len(p) == 2 and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", p[0]) for p in parts):
            decls += [(p[0].strip(), set(_C_NAME.findall(p[1])), ln.strip()) for p in parts]
        else:
            other |= set(_C_NAME.findall(ln))
    live = set(other)
    changed = True
    while changed:
        changed = False
        for var, reads, _ in decls:
            if var in live and not reads <= live:
                live |= reads
                changed = True
    return [f"{name}: {var!r} never read: {ln}" for var, _, ln in decls if var not in live]


def dead_c(text: str) -> list[str]:
    text = _C_COMMENT.sub("", text)
    return [d for name, lines in _c_functions(text).items() for d in _dead_in_c_function(name, lines)]


# ---------------------------------------------------------------------------- the programs

@functools.lru_cache(maxsize=None)
def programs(name: str) -> dict[str, tuple[str, str]]:
    """label -> (language, text) of every program the backends generate for the cell."""
    spec = recdsl.load(name)
    ir = spec.lower(**spec.analysis_dims())
    out = {}
    if ir.over == "seq":
        out["reference step"] = ("py", reference.emit_step(ir))
    else:   # grids and DAGs: the reference evaluates each node with its own small program
        evaluated = [n for n in ir.nodes() if n.srcs and n.op != Op.SUM_IN]
        out["reference node programs"] = ("py", "".join(nodes_source([n], list(n.srcs)) for n in evaluated))
    plan = plan_cell(ir, verify=False)
    for b in ("torch", "triton"):
        sel = plan.selections[b]
        if sel.cannot:
            continue
        emitted = backend_module(b).emit(plan, sel)
        if b == "triton":
            kernels, source, em = emitted
            out["triton kernels"] = ("py", kernels)
            out["triton driver"] = ("py", source)
        else:
            source, em = emitted
            out["torch forward"] = ("py", source)
        for i, fl in enumerate(em.fused):
            out[f"{b} C loop {i}"] = ("c", fl.source)
    return out


def _dead(lang: str, text: str) -> list[str]:
    return dead_python(text) if lang == "py" else dead_c(text)


@pytest.mark.parametrize("name", CELLS)
def test_generated_python_has_no_dead_values(name):
    bad = [f"{label}: {d}" for label, (lang, text) in programs(name).items() if lang == "py"
           for d in _dead(lang, text)]
    assert not bad, f"{name}: values computed and never read:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("name", CELLS)
def test_fused_loop_c_has_no_dead_values(name):
    bad = [f"{label}: {d}" for label, (lang, text) in programs(name).items() if lang == "c"
           for d in _dead(lang, text)]
    assert not bad, f"{name}: values computed and never read:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------------------- the checker itself

def test_python_checker_finds_dead_values():
    text = ("def f(inputs, params):\n"
            "    a = inputs + 1\n"      # read only by b, which is dead: dead too
            "    b = a * 2\n"
            "    acc = inputs\n"
            "    for t in range(3):\n"
            "        acc = acc * t\n"    # reads itself only: dead
            "    u, v = inputs\n"        # a bundle: v unread is dead
            "    k, _ = params\n"        # `_`: not read, and says so
            "    p, q = g(inputs)\n"     # one call's results: q may go unread
            "    def core(s):\n"
            "        w = s + 1\n"       # dead in the nested scope
            "        return s + u + k\n"
            "    ran.append(1)\n"
            "    return run(core, p)\n")
    got = {d.split(" ")[1] for d in dead_python(text)}
    assert got == {"'a'", "'b'", "'acc'", "'v'", "'w'"}


def test_c_checker_finds_dead_values():
    text = ("void loop(float* out, int64_t T) {\n"
            "  for (int64_t t = 0; t < T; t++) {\n"
            "    float v0 = out[t];  /* x.rec:1 */\n"
            "    float v1 = (v0 + v0);\n"          # read only by the dead v2
            "    float v2 = EXP(v1);\n"
            "    int64_t a = t + 1, b = a * 2;\n"  # b dead, a read by b only: dead
            "    const float* restrict row = out + t;\n"
            "    { float* tmp = out; out = row; }\n"      # several statements: code that reads

            "    out[t] = v0 + row[0];\n"
            "  }\n"
            "}\n")
    got = {d.split(" ")[1] for d in dead_c(text)}
    assert got == {"'v1'", "'v2'", "'a'", "'b'"}


# ---------------------------------------------------------------------------- per-step setup

# A cell whose torch loops read constant tensors (the scalar operands of max / min / clamp /
# where, an identity matrix): the stdlib's loops happen to read none.
CONSTANTS_CELL = """
cell Consts(D, H):
    input x[D]
    param W[H, H] ~ normal(0, 1/sqrt(H))
    param U[H, D] ~ normal(0, 1/sqrt(D))
    param g[H] ~ normal(0, 1)
    state h[H] = 0
    state n[H, H] = 0
    a = W @ h + U @ x
    c = clamp(a, -1.5, 2.0)
    h' = max(tanh(a), 0.1) + where(a > 0.0, c, 0.25) * g + min(a * 0.5, 1.0)
    n' = tanh(n @ eye(H) + outer(h, h') * 0.5)
    output h'
"""
# what builds a tensor from nothing (torch.X(...)), or reshapes a constant (seq_rt.with_prefix)
CONSTRUCTORS = {"tensor", "as_tensor", "eye", "zeros", "ones", "full", "arange", "empty", "linspace"}


def _constant_builds(text: str) -> list[str]:
    """`function: line` for every call building a constant tensor inside a per-step `core`."""
    tree = ast.parse(text)
    lines = text.splitlines()
    found = []
    for f in ast.walk(tree):
        if not (isinstance(f, ast.FunctionDef) and f.name.startswith("core")):
            continue
        for c in ast.walk(f):
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name):
                owner, attr = c.func.value.id, c.func.attr
                if (owner == "torch" and attr in CONSTRUCTORS) or \
                        (owner in ("seq_rt", "torch_rt") and attr == "with_prefix"):
                    found.append(f"{f.name}: {lines[c.lineno - 1].strip()}")
    return found


@functools.lru_cache(maxsize=None)
def _constants_cell_programs():
    spec = recdsl.load(CONSTANTS_CELL)
    plan = plan_cell(spec.lower(D=3, H=4), verify=False)
    return {b: backend_module(b).emit(plan, plan.selections[b])[0 if b == "torch" else 1] for b in ("torch", "triton")}


@pytest.mark.parametrize("name", CELLS + ["<constants>"])
def test_loop_step_builds_no_constants(name):
    if name == "<constants>":
        texts = _constants_cell_programs()
        assert all("def core" in t for t in texts.values())   # the cell does run torch loops
    else:
        texts = {label: text for label, (lang, text) in programs(name).items()
                 if label in ("torch forward", "triton driver")}
    bad = [f"{label}: {d}" for label, text in texts.items() for d in _constant_builds(text)]
    assert not bad, f"{name}: constants built at every step:\n  " + "\n  ".join(bad)


def test_hoisted_constants_compute_the_same_numbers():
    """The constants made once (and the values computed from them) give the reference's
    outputs, states and gradients, through the loop and its custom backward."""
    spec = recdsl.load(CONSTANTS_CELL)
    for grads in (True, False):
        errs = compare_backends(spec, {"D": 3, "H": 4}, "torch", grads=grads)
        assert max(v for k, v in errs.items() if k != "scale") < 1e-10, errs


def test_run_loop_sets_up_params_once():
    """run_loop builds the params' views once per loop (forward, and backward's reverse
    loop), not once per step: the core sees the same dicts at every step."""
    seen: dict[str, set] = {"params": set(), "step_params": set()}

    def core(ins, st, params, step_params):
        seen["params"].add(id(params))
        seen["step_params"].add(id(step_params))
        (x,), (h,) = ins, st
        return (torch.tanh(x + h * step_params["w"]),)

    T = 6
    x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(2, 3, dtype=torch.float64)
    seqs = seq_rt.run_loop(core, [x], [h0], {"w": w}, T)
    assert len(seen["params"]) == len(seen["step_params"]) == 1
    seqs[0].sum().backward()
    assert len(seen["params"]) == len(seen["step_params"]) == 2   # one more set for the backward's loop
    assert w.grad is not None and x.grad is not None
