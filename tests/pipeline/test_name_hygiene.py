"""Name hygiene: a user may name a value anything the checker accepts, and the generated
code computes the same numbers.

Generated code names user values and temporaries from one scheme (recdsl/torch_expr.py,
"names in generated code"). This test does not trust the scheme: for every stdlib
sequence cell it reads the identifiers the emitters actually wrote (reference step, torch
forward, Triton driver and kernel module, generated C), finds in them the *patterns* that
wrap each user name (`p_{}`, `{}_next`, `t7_{}`, ...) and the fixed names (helpers,
temporaries), and solves for renamings that would make two different values share a name:

  * pattern against pattern: names a, b of two user values with prefix1 + a + suffix1 ==
    prefix2 + b + suffix2 (param `next` and state `p` once both gave `p_next`);
  * pattern against a fixed name: prefix + a + suffix == a helper or a temporary (state
    `h_2` once gave `s_h_2`, a temporary's name);
  * bare: a user value named exactly like a helper or temporary (`inputs`, `torch`, `t3`, `F`).

Each renaming is applied to the parsed cell (recdsl.printer prints the renamed AST: no
text replacement), every user identifier of the cell (dims, inputs, params, states,
locals, outputs, loop variables) being renamed at once, and the result is checked two ways:

  * statically, for every renaming and every backend's generated text: the renamed cell's
    code is the original code under a one-to-one renaming of its identifiers (a collision
    merges two names, so it cannot be);
  * numerically: outputs and final states BIT-IDENTICAL to the un-renamed cell's (same
    parameter tensors mapped by name, same inputs), on the reference (the oracle), on torch
    (its fused C loop under no_grad and its torch loop with gradients) and, `slow`, on
    Triton (the interpreter on CPU).
"""
from __future__ import annotations

import copy
import functools
import itertools
import keyword
import re

import pytest
import torch

import recdsl
from recdsl import ast as A
from recdsl import checker
from recdsl.backends import reference
from recdsl.builtins import BUILTINS, DISTRIBUTIONS
from recdsl.errors import RecError
from recdsl.pipeline import backend_module, plan_cell
from recdsl.printer import to_source
from recdsl.builtins import FORWARD_OPTIONS
from recdsl.spec import stdlib_files

CELLS = [n for n in stdlib_files() if recdsl.load(n).cell.over == "seq"]
B, T = 2, 5
# keyword arguments of CellSpec.__call__: a dim cannot be passed under these names (an API limit, not codegen's)
CALL_KWARGS = {"backend", "heads", "reverse", "dtype", "device"}
BARE_ROUNDS = 2   # renamings to helpers' and temporaries' own names (inputs, states, params, torch, F, seq_rt, t3, ...)


# ---------------------------------------------------------------------------- renaming the AST

def user_names(cell: A.Cell) -> dict[str, str]:
    """Every identifier the user introduces in the cell -> its role."""
    roles: dict[str, str] = {a.name: "dim" for a in cell.args}

    def body(items):
        for it in items:
            if isinstance(it, A.Decl):
                for v in it.vars:
                    roles[v.name] = it.kind
            elif isinstance(it, A.Assign):
                for t in it.targets:
                    if isinstance(t, A.Name):
                        roles.setdefault(t.id, "local")
            elif isinstance(it, A.Output) and it.name is not None:
                roles.setdefault(it.name, "output")
            elif isinstance(it, A.For):
                roles.setdefault(it.var, "loop")
                body(it.body)
    body(cell.items)
    return roles


def rename(cell: A.Cell, mapping: dict[str, str]) -> str:
    """The cell's source with every user identifier renamed (on the AST: builtins, keyword
    arguments, distributions and attributes such as `.T` are not names of values)."""
    keep = {}   # spans and types are shared, not copied (they hold the whole source text)
    for n in cell.walk():
        keep[id(n.span)] = n.span
        keep[id(getattr(n, "ty", None))] = getattr(n, "ty", None)
    cell = copy.deepcopy(cell, keep)
    r = lambda s: mapping.get(s, s)  # noqa: E731
    for node in cell.walk():
        if isinstance(node, (A.CellArg, A.DeclVar)):
            node.name = r(node.name)
        elif isinstance(node, (A.Name, A.Primed)):
            node.id = r(node.id)
        elif isinstance(node, A.Output) and node.name is not None:
            node.name = r(node.name)
        elif isinstance(node, A.For):
            node.var = r(node.var)
    return to_source(cell)


def allowed(name: str, role: str, module_attrs: set) -> bool:
    """`name` may name a value of `role`: what the checker accepts (its own rules, asked
    directly), less the names the runtime's Python API takes for itself (forward()'s options,
    spec()'s, nn.Module attributes, `self`)."""
    if not (name.isidentifier() and name.isascii()) or name in BUILTINS or name in DISTRIBUTIONS:
        return False
    try:
        checker.check_identifier(name, None, "a value")
        if role in ("dim", "input", "param"):
            checker.check_api_name(name, None, role)
    except RecError:
        return False
    if name == "self":
        return False
    if role == "input":
        return name not in FORWARD_OPTIONS
    if role == "param":
        return name not in module_attrs
    if role == "dim":
        return name not in CALL_KWARGS
    return True


# ---------------------------------------------------------------------------- generated identifiers

NAME, STRING, OTHER = "name", "string", "other"
_TOKEN = r"""(?P<comment>{comment})
                      |(?P<string>\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
                      |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
                      |(?P<other>\d[\w.]*|\S)"""
PY_TOKEN = re.compile(_TOKEN.replace("{comment}", r"\#[^\n]*"), re.X)
C_TOKEN = re.compile(_TOKEN.replace("{comment}", r"/\*[\s\S]*?\*/"), re.X)


def tokens(text: str, c: bool = False) -> list[tuple[str, str]]:
    """(kind, text) of the tokens of generated Python (or C), comments dropped (they show
    the .rec source, names included, and are never code)."""
    return [(m.lastgroup, m.group()) for m in (C_TOKEN if c else PY_TOKEN).finditer(text)
            if m.lastgroup != "comment"]


def generated(spec) -> dict[str, list]:
    """label -> the tokens of each text the backends generate for the cell (one plan)."""
    ir = spec.lower(**spec.analysis_dims())
    plan = plan_cell(ir, verify=False)
    out = {"reference": tokens(reference.emit_step(ir))}
    for b in ("torch", "triton"):
        emitted = backend_module(b).emit(plan, plan.selections[b])
        if b == "triton":
            kernels, source, em = emitted
            out["triton kernels"] = tokens(kernels)
        else:
            source, em = emitted
        out[b] = tokens(source)
        for i, fl in enumerate(em.fused):
            out[f"{b} C loop {i}"] = tokens(fl.source, c=True)
    return out


def identifiers(texts: dict) -> set[str]:
    return {s for toks in texts.values() for ty, s in toks if ty == NAME and not keyword.iskeyword(s)}


def bound_names(toks: list) -> set[str]:
    """The Python identifiers that are names of values (not attributes: `torch.exp`'s exp)."""
    return {s for i, (ty, s) in enumerate(toks) if ty == NAME and not keyword.iskeyword(s)
            and (i == 0 or toks[i - 1][1] != ".")}


def markers(users) -> dict[str, str]:
    """A unique marker per user name (lowercase: it survives a .lower() in an emitter)."""
    return {u: f"qz{i}zq" for i, u in enumerate(users)}


def patterns(marks: dict[str, str], names: set[str]):
    """(user -> {(prefix, suffix)} of the identifiers the emitters built from it, the
    identifiers built from no user name). Read off the code of the cell with its user names
    replaced by markers, so that a user name that happens to be a helper's (`m`, a Triton
    mask) is not mistaken for a use. An identifier built from several user names (a Triton
    kernel's name joins its stage's states) is one value: the static check covers it."""
    pats = {u: set() for u in marks}
    fixed = set()
    for g in names:
        found = [(u, m) for u, m in marks.items() if m in g]
        if not found:
            fixed.add(g)
        elif len(found) == 1:
            u, m = found[0]
            i = g.find(m)
            pats[u].add((g[:i], g[i + len(m):]))
    return pats, sorted(fixed)


def overlaps(p1, s1, p2, s2):
    """Pairs (a, b) with p1 + a + s1 == p2 + b + s2: a spare middle word, none, and every
    overlap of the longer prefix with the longer suffix."""
    if not (p1.startswith(p2) or p2.startswith(p1)) or not (s1.endswith(s2) or s2.endswith(s1)):
        return []
    P, S = max(p1, p2, key=len), max(s1, s2, key=len)
    whole = [P + "z" + S, P + S] + [P + S[k:] for k in range(1, min(len(P), len(S)) + 1) if P.endswith(S[:k])]
    out = []
    for F in whole:
        if len(F) < max(len(p1) + len(s1), len(p2) + len(s2)):
            continue
        a, b = F[len(p1):len(F) - len(s1)], F[len(p2):len(F) - len(s2)]
        if a.isidentifier() and b.isidentifier():
            out.append((a, b))
    return out


def _shape(text: str) -> str:
    return re.sub(r"\d+", "#", text)


def collision_classes(pats: dict, fixed: list) -> dict:
    """kind of collision -> the renamings ({user: new name}) that produce it. Kinds abstract
    numbers (a temporary's number is not the point) so that one renaming stands for many."""
    users = list(pats)
    out: dict = {}
    for u1, u2 in itertools.product(users, users):
        for (p1, s1), (p2, s2) in itertools.product(sorted(pats[u1]), sorted(pats[u2])):
            if u1 == u2 and (p1, s1) == (p2, s2):
                continue
            for k, (a, b) in enumerate(overlaps(p1, s1, p2, s2)):
                if (u1 == u2) != (a == b):
                    continue
                key = ("pattern", _shape(p1), _shape(s1), _shape(p2), _shape(s2), u1 == u2, k)
                out.setdefault(key, []).append({u1: a, u2: b})
    for u in users:
        for p, s in sorted(pats[u]):
            for g in fixed:
                if g.startswith(p) and g.endswith(s) and len(g) > len(p) + len(s):
                    key = ("fixed", _shape(p), _shape(s), re.sub(r"[A-Za-z]+", "w", _shape(g)))
                    out.setdefault(key, []).append({u: g[len(p):len(g) - len(s)]})
    return out


def _fits(r: dict, c: dict) -> bool:
    if len(set(c.values())) != len(c):
        return False
    taken = {v: u for u, v in r.items()}
    return all(r.get(u, v) == v and taken.get(v, u) == u for u, v in c.items())


def pack(classes: dict, ok) -> list[dict]:
    """Few renamings realising every class (one alternative each), greedily."""
    rounds: list[dict] = []
    for key in sorted(classes, key=lambda k: (len(classes[k]), k)):
        alts = [c for c in classes[key] if all(ok(v, u) for u, v in c.items())]
        for r in rounds:
            c = next((c for c in alts if _fits(r, c)), None)
            if c is not None:
                r.update(c)
                break
        else:
            if alts:
                rounds.append(dict(alts[0]))
    return rounds


def bare(users: dict, order: list[str], ok) -> list[dict]:
    """Renamings that give the users the fixed names themselves, in that order, each fixed
    name to some user allowed to take it."""
    rounds: list[dict] = []
    for g in order:
        for r in rounds:
            u = next((u for u in users if u not in r and ok(g, u)), None)
            if u is not None:
                r[u] = g
                break
        else:
            u = next((u for u in users if ok(g, u)), None)
            if u is not None:
                rounds.append({u: g})
    return rounds


def complete(users: dict, partial: dict) -> dict:
    """A one-to-one renaming of every user name: the others keep theirs unless taken."""
    taken = set(partial.values())
    out = dict(partial)
    k = 0
    for u in users:
        if u not in out:
            new = u
            while new in taken:
                new, k = f"free{k}", k + 1
            out[u] = new
            taken.add(new)
    return out


@functools.lru_cache(maxsize=None)
def study(name: str):
    """(the cell as printed, its user names, its generated texts, the renamings to check)."""
    cell = recdsl.load(name).cell.ast
    users = user_names(cell)
    plain = rename(cell, {})   # the printer's layout on both sides: the same .rec lines in comments
    texts = generated(load(plain))
    marks = markers(users)
    pats, fixed = patterns(marks, identifiers(generated(load(rename(cell, marks)))))
    ok = lambda new, u: allowed(new, users[u], module_attrs()) and new != u  # noqa: E731
    collide = pack(collision_classes(pats, fixed), ok)
    # bare: first the names of the texts user names reach (the Python code, and the kernel
    # module's own top level: helpers inputs, states, params, prefix_rank, torch, F, seq_rt, tl, step, forward, the
    # temporaries t3, seqs7), rotated per cell so that the cells between them take every
    # one; then the names inside the Triton kernels
    kern = texts["triton kernels"]
    top = {kern[i + 1][1] for i, (_, s) in enumerate(kern[:-1]) if s in ("def", "import", "as")}
    near = sorted(set().union(top, *(bound_names(texts[k]) for k in ("reference", "torch", "triton")))
                  & set(fixed))
    far = sorted(bound_names(texts["triton kernels"]) & set(fixed) - set(near))
    k = 7 * CELLS.index(name) % max(1, len(near)) if name in CELLS else 0
    helpers = bare(users, near[k:] + near[:k] + far, ok)[:BARE_ROUNDS]
    return plain, users, texts, pats, [complete(users, r) for r in helpers + collide]


@functools.lru_cache(maxsize=None)
def module_attrs() -> set:
    """The attribute names of a compiled module (a param cannot take one)."""
    spec = recdsl.load("cell A(D):\n    input x[D]\n    output y = 2 * x\n")
    return set(dir(spec(backend="reference", D=2)))


@functools.lru_cache(maxsize=None)
def load(source: str):
    return recdsl.load(source)


# ---------------------------------------------------------------------------- the checks

def renamed_key(mapping: dict[str, str], key: str) -> str:
    """A state dict key (or a string literal of generated code) under a renaming of user names:
    a part of a complex state, `h.re` (recdsl.ir.part_name), follows its state's name."""
    if key in mapping:
        return mapping[key]
    base, dot, part = key.rpartition(".")
    return mapping[base] + dot + part if dot and base in mapping else key


def alpha_equivalent(orig: list, new: list, mapping: dict[str, str]) -> str | None:
    """None if `new` is `orig` under a one-to-one renaming of identifiers (string literals
    renamed by the user mapping), else where it is not."""
    if len(orig) != len(new):
        return f"{len(orig)} tokens became {len(new)}"
    fwd: dict[str, str] = {}
    back: dict[str, str] = {}
    for i, ((t1, a), (t2, b)) in enumerate(zip(orig, new)):
        if t1 != t2:
            return f"token {i}: {a!r} became {b!r}"
        if t1 == NAME:
            if fwd.setdefault(a, b) != b:
                return f"{a!r} is written both {fwd[a]!r} and {b!r}"
            if back.setdefault(b, a) != a:
                return f"{b!r} names both {back[b]!r} and {a!r} (a collision)"
        elif t1 == STRING:   # a user name as a key (inputs['x'], params['W']) is renamed with the user's
            renamed = a[0] + renamed_key(mapping, a[1:-1]) + a[-1] if a[:1] in "'\"" else a
            if b not in (a, renamed):
                return f"string {a!r} became {b!r}"
        elif a != b:
            return f"token {i}: {a!r} became {b!r}"
    return None


@pytest.mark.parametrize("name", CELLS)
def test_generated_code_is_the_same_under_any_renaming(name):
    plain, users, texts, pats, renamings = study(name)
    assert any(pats.values()), f"{name}: no user name found in the generated code (the markers are lost?)"
    for mapping in renamings:
        got = generated(load(rename(load(plain).cell.ast, mapping)))
        assert set(got) == set(texts), (name, mapping)
        for label in texts:
            why = alpha_equivalent(texts[label], got[label], mapping)
            assert why is None, f"{name}, {label}, renamed {_diff(mapping)}: {why}"
            if "C loop" in label:   # the C names values by number: no user name reaches it at all
                assert got[label] == texts[label], f"{name}, {label}, renamed {_diff(mapping)}"


def _diff(mapping):
    return {k: v for k, v in mapping.items() if k != v}


def _run(spec, backend, mapping, params, grads, layer=None):
    """(outputs, final states by the original names) per entry of grads: the forward under
    no_grad (False) or with inputs that require gradients (True)."""
    inv = {v: k for k, v in mapping.items()}
    if layer is None:
        layer = spec(backend=backend, **spec.analysis_dims()).double()   # sizes by position: the same
        layer.load_state_dict({mapping[k]: v for k, v in params.items()})
    g = torch.Generator().manual_seed(0)
    heads = (layer.heads,) if layer.heads else ()
    xs, st = {}, {}
    for n, v in spec.cell.inputs.items():   # drawn in declaration order: the same for both namings
        x = torch.randn((B, T) + heads + layer.ir.concrete(v.shape), dtype=torch.float64, generator=g) * 0.5
        xs[n] = -x.abs() if inv[n] in ("gk", "g", "gv", "w", "log_decay") else x
    for n, v in layer.initial_state(B, torch.float64).items():
        st[n] = v + 0.1 * torch.randn(v.shape, dtype=torch.float64, generator=g)
    results = []
    for grad in grads:
        with torch.set_grad_enabled(grad):
            out, fin = layer(**{k: v.clone().requires_grad_(grad) for k, v in xs.items()}, state=st)
        out = out if isinstance(out, tuple) else (out,)
        results.append((grad, [o.detach() for o in out], {renamed_key(inv, k): v.detach() for k, v in fin.items()}))
    return results


def _numbers(name, backends):
    plain, users, _, _, renamings = study(name)
    base = load(plain)
    torch.manual_seed(0)
    ref = base(backend="reference", **base.analysis_dims()).double()
    params = ref.state_dict()
    for backend, grads in backends:
        want = _run(base, backend, {u: u for u in users}, params, grads, ref if backend == "reference" else None)
        for mapping in renamings:
            got = _run(load(rename(base.cell.ast, mapping)), backend, mapping, params, grads)
            for (grad, o1, s1), (_, o2, s2) in zip(want, got):
                where = f"{name} on {backend}{' with gradients' if grad else ''}, renamed {_diff(mapping)}"
                assert len(o1) == len(o2) and set(s1) == set(s2), where
                for a, b in zip(o1, o2):
                    assert torch.equal(a, b), f"{where}: outputs differ by {float((a - b).abs().max()):.3g}"
                for k in s1:
                    assert torch.equal(s1[k], s2[k]), \
                        f"{where}: state {k} differs by {float((s1[k] - s2[k]).abs().max()):.3g}"


@pytest.mark.parametrize("name", CELLS)
def test_numbers_are_bit_identical_under_renaming(name):
    # torch: its fused C loop (no_grad) and its torch loop (gradients) where a stage loops
    _numbers(name, [("reference", (False,)), ("torch", (False, True))])


@pytest.mark.slow
@pytest.mark.parametrize("name", CELLS)
def test_triton_numbers_are_bit_identical_under_renaming(name):
    _numbers(name, [("triton", (True,))])


# ---------------------------------------------------------------------------- the reported cells
# Cells users wrote: each against the same cell with neutral names (a1, a2, ...).
REPORTED = {
    # reference: param `next` was p_next, and so was state p's new value (the output read the wrong one)
    "param next, state p": """cell A(D):
    input x[D]
    param next[D] ~ normal(0, 1)
    state p[D] = 0
    p' = tanh(next * p + x)
    output y = p' * next
""",
    # reference: state s's new value was s_next, and so was state `next`'s previous value
    "states s and next": """cell A(D):
    input x[D]
    state s[D] = 0
    state next[D] = 0
    s' = tanh(x - next)
    next' = sigmoid(s' + next)
    output y = s' * next'
""",
    # torch loop: state h_5 was s_h_5 in the loop, and so was the temporary of `s_h` (the 5th)
    "state h_5, local s_h": """cell A(D):
    input x[D]
    param W[D, D] ~ normal(0, 0.5)
    state h_5[D] = 0
    s_h = W @ h_5
    h_5' = tanh(s_h + x) + 0.5 * h_5
    output h_5'
""",
}


@pytest.mark.parametrize("case", REPORTED)
def test_reported_cells(case):
    cell = load(REPORTED[case]).cell.ast
    users = user_names(cell)
    neutral = {u: f"a{i}" for i, u in enumerate(users)}
    spec, base = load(rename(cell, {})), load(rename(cell, neutral))
    torch.manual_seed(0)
    params = {k: v.double() for k, v in spec(backend="reference", D=3).state_dict().items()}
    for backend, grads in (("reference", (False,)), ("torch", (False, True))):
        got = _run(spec, backend, {u: u for u in users}, params, grads)
        want = _run(base, backend, neutral, params, grads)
        for (grad, o1, s1), (_, o2, s2) in zip(want, got):
            assert all(torch.equal(a, b) for a, b in zip(o1, o2)), (case, backend, grad)
            assert all(torch.equal(s1[k], s2[k]) for k in s1), (case, backend, grad)
