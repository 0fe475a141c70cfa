"""The analysis pipeline: IR -> Plan, as small named passes.

    reassociate   group the sums' state-free terms so that they hoist as one expression
    dependencies  the state dependency graph (networkx)
    stages        its strongly connected components, in topological order
    hoist         what reads no state: computed for all steps at once
    classify      per stage: degree, affine terms, semiring form, Jacobian structure
    verify        sympy proofs (coefficients reproduce the update; combine is associative)
                  and float64 spot checks on random values
    readouts      which outputs read their stage's state linearly (fusable)
    ranges        the value range of every decay; a warning where a state may grow without bound
    stability     grids and DAGs: pLSTM's P-mode / D-mode conditions; a warning where long-range
                  propagation may explode

What runs each stage, on each backend, is decided after the analysis, by recdsl.lowering
(forms, matchers, kernel registries, select): the analysis imports no backend.

`analyze(ir, trace=dict)` fills `trace` with each pass's result as text, which
`recdsl inspect --stage passes` prints."""
from __future__ import annotations

import re
import time

from .. import plan as P
from ..ir import IRCell, Node, Op, toposort
from ..types import ONE
from . import stages as S
from .locality import local_axis
from .linear import AFFINE, FREE, NONLINEAR, StageAnalysis, Term, add, mul
from .ranges import describe, log_form, transition_warning
from .stability import stability
from .symbolic import (NotElementwise, combine_is_associative, is_zero, lift, max_err, node_text, random_leaves,
                       show, to_sympy)


def analyze(ir: IRCell, trace: dict | None = None, verify: bool = True) -> P.Plan:
    t0 = time.perf_counter()
    trace = trace if trace is not None else {}
    ir, n_reassoc = S.reassociate(ir)
    trace["reassociate"] = f"{n_reassoc} sum(s) regrouped so that their state-free terms come first"
    graph = S.dependency_graph(ir)
    trace["dependencies"] = "\n".join(f"{a} -> {b}" for a, b in sorted(graph.edges)) or "(no edges)"
    stage_list = S.stages(ir, graph)
    trace["stages"] = "\n".join(f"stage {i}: {', '.join(st)}" for i, st in enumerate(stage_list))
    place = S.placement(ir, stage_list)
    hoisted = [_describe_hoisted(n) for n in S.frontier(ir, place)]
    trace["hoist"] = "\n".join(hoisted) or "(nothing to hoist)"
    stage_plans = [_classify(ir, k, st, graph, verify) for k, st in enumerate(stage_list)]
    trace["classify"] = "\n".join(f"stage {s.index} {s.states}: {s.cls} ({s.detail}) -- {s.reason}"
                                  for s in stage_plans)
    trace["verify"] = "\n".join(f"stage {s.index}: " + "; ".join(s.checks) for s in stage_plans if s.checks) \
        or "(nothing to verify)"
    outputs = _readouts(ir, stage_list, place)
    trace["readouts"] = "\n".join(f"{o.name}: {o.kind} {o.stages}" for o in outputs)
    warnings = _ranges(ir, stage_plans)
    trace["ranges"] = "\n".join(f"stage {s.index}: {s.decay_range}" for s in stage_plans if s.decay_range) \
        + "".join(f"\nwarning: {w}" for w in warnings) or "(no decays)"
    stable = stability(ir, {s.index: s.states for s in stage_plans if s.cls != P.HOISTED})
    trace["stability"] = stable.text if stable is not None else "(over a sequence, or nothing propagates linearly)"
    if stable is not None and stable.warning():
        warnings.append(stable.warning())
    plan = P.Plan(ir.name, dict(ir.dims), ir.over, stage_plans, outputs, hoisted, ir=ir, verified=verify,
                  warnings=warnings, stability=stable)
    plan.seconds = time.perf_counter() - t0
    return plan


def verify(plan: P.Plan) -> P.Plan:
    """Run the sympy / float64 checks of an unverified plan (analysed with verify=False,
    as modules are built), in place: the plan stays the one that runs."""
    if not plan.verified:
        checked = analyze(plan.ir, verify=True)
        for s, c in zip(plan.stages, checked.stages):
            s.checks = c.checks
        plan.verified = True
    return plan


def _ranges(ir: IRCell, stage_plans) -> list[str]:
    """The value range of every linear stage's decay (stage.decay_range), and a warning per
    decay that can exceed 1 in magnitude. A semiring's `a` is an offset, not a decay."""
    warnings = []
    for s in stage_plans:
        decay = s.nodes.get("a") if s.cls == P.DIAGONAL else s.nodes.get("decay") if s.cls == P.LOW_RANK else None
        if decay is None:
            continue
        s.decay_range = describe(decay, ir)
        w = transition_warning(decay, ir, s.states[0])
        if w:
            warnings.append(w)
    return warnings


def _describe_hoisted(n: Node) -> str:
    text = show(n)
    if not any(x.op == Op.INPUT for x in toposort([n])):
        kind = "once per call: reads no input"
    else:
        kind = "matmul over B*T" if n.op == Op.MATMUL or "@" in text else "elementwise over B*T"
    return f"{text} [{', '.join(str(d) for d in n.shape)}] ({kind}{', line ' + str(n.span.line) if n.span else ''})"


# --------------------------------------------------------------------------- classify

def _stage_leaves(ir: IRCell, states: list[str]) -> list[Node]:
    return [n for n in ir.state_leaves() if n.arg[0] in states]


def _classify(ir: IRCell, k: int, states: list[str], graph, verify: bool) -> P.StagePlan:
    leaves = _stage_leaves(ir, states)
    an = StageAnalysis(leaves)
    updates = {s: ir.updates[s] for s in states}
    line = min((u.span.line for u in updates.values() if u.span), default=None)
    degs = {s: an.degree(u) for s, u in updates.items()}
    recurrent = any(graph.has_edge(a, b) for a in states for b in states)

    earlier = sorted({n.arg[0] for u in updates.values() for n in _leaves_of(u)
                      if n.op == Op.STATE and n.arg[0] not in states}, key=list(ir.states).index)

    def plan(cls, detail, reason, **kw):
        if earlier and cls not in (P.NONLINEAR, P.HOISTED):
            detail = (detail + ", " if detail else "") + f"given {', '.join(earlier)}"
        return P.StagePlan(k, states, cls, detail, reason, line, **kw)

    if not recurrent:
        return plan(P.HOISTED, "", f"{states[0]}' reads no previous state, so it needs no recurrence")

    if ir.over != "seq":
        if max(degs.values()) <= AFFINE:
            return plan(P.DAG_LINEAR, "linear in the neighbours' states",
                        "every update is a sum of neighbour states times state-free coefficients")
        bad = next(s for s, d in degs.items() if d == NONLINEAR)
        return plan(P.NONLINEAR, "over a DAG", f"{bad}' applies a nonlinearity to neighbour states")

    if max(degs.values()) == NONLINEAR:
        if len(states) == 1:
            sr = an.semiring(updates[states[0]], (states[0], "prev"))
            if sr is not None and sr[0] is not None and sr[1] is not None:
                return _semiring_plan(ir, plan, an, states[0], sr, verify)
            dense = an.dense_semiring(updates[states[0]], (states[0], "prev"))
            if dense is not None:
                return _dense_semiring_plan(ir, plan, states[0], dense, verify)
        return _nonlinear_plan(ir, plan, an, states, updates, degs)

    forms = {s: an.form(u) for s, u in updates.items()}
    terms = [t for f in forms.values() for t in f.terms]
    dense = [t for t in terms if t.kind == "dense"]
    if dense:
        return plan(P.DENSE, _dense_detail(dense[0]), f"affine, but {dense[0].why} mixes state elements",
                    checks=_check_affine(ir, leaves, updates) if verify else [])
    if len(states) == 1:
        s = states[0]
        diag = [t for t in terms if t.kind == "diag"]
        low = [t for t in terms if t.kind == "lowrank"]
        other = [t for t in terms if t.kind not in ("diag", "lowrank")]
        if other:
            return plan(P.DENSE, "", f"{s}' contains a contraction of {s} that is not re-expanded")
        a = None  # None: the decay is the identity
        if not diag:  # no term keeps the state itself: S' = outer(k, k @ S) + ... decays by 0
            a = Node(Op.CONST, (), (), 0.0)
        elif any(t.scale is not None for t in diag) or len(diag) > 1:
            for t in diag:
                a = add(a, t.scale if t.scale is not None else _one())
        if not low:
            return _diagonal_plan(ir, plan, s, a, forms[s].offset, verify)
        return _lowrank_plan(ir, plan, s, a, low, forms[s].offset, verify, leaves, updates)
    # several states, elementwise couplings only: block-diagonal
    shapes = {tuple(ir.states[s].shape) for s in states}
    if len(shapes) == 1 and all(t.kind == "diag" for t in terms):
        return _block_plan(ir, plan, states, forms, verify, leaves, updates)
    return plan(P.DENSE, "", "several states coupled through differently shaped values")


def _leaves_of(n: Node) -> list[Node]:
    return [x for x in toposort([n]) if not x.srcs]


def _one() -> Node:
    return Node(Op.CONST, (), (), 1.0)


def _dense_detail(t: Term) -> str:
    return f"transition from {t.why}"


def _decay_kind(a: Node | None, state_shape) -> str:
    if a is None or (a.op == Op.CONST and a.arg == 1.0):
        return "identity"
    if a.rank == 0 or all(d == ONE for d in a.shape):
        return "scalar"
    if tuple(a.shape) == tuple(state_shape):
        return "elementwise"
    return "vector"


def _diagonal_plan(ir, plan, s, a, b, verify):
    state = ir.states[s]
    kind = _decay_kind(a, state.shape)
    coeffs = {"a": show(a, "1"), "b": show(b)}
    g = log_form(a, ir) if a is not None else None
    if g is not None:
        coeffs["log a"] = show(g)
    checks = []
    if verify:
        checks += _verify_diagonal(ir, state, ir.updates[s], a, b)
        checks.append("combine (a1*a2, a2*b1 + b2) is associative and composes steps (sympy)"
                      if combine_is_associative("diagonal") else "combine NOT proven associative")
    chunk = state.rank == 2 and kind in ("identity", "scalar", "vector") and has_outer(b)
    detail = f"{kind} decay" + (", log space" if g is not None else "")
    reason = f"{s}' = a * {s} + b with a, b free of {s}"
    if chunk:
        reason += "; the state is a matrix built from outer products"
    return plan(P.DIAGONAL, detail, reason, coefficients=coeffs, checks=checks, decay=kind,
                nodes={"a": a, "b": b, "log_a": g})


def has_outer(n: Node | None) -> bool:
    if n is None:
        return False
    return any(x.op == Op.OUTER for x in toposort([n]))


def _verify_diagonal(ir, state, update, a, b) -> list[str]:
    out = []
    sym = __import__("sympy").Symbol(state.arg[0], real=True)
    try:
        U = to_sympy(update, {state.id: sym}, True, depends=lambda n: n is state)
        A = to_sympy(a, {}, True) if a is not None else 1
        B = to_sympy(b, {}, True) if b is not None else 0
        ok = is_zero(U - (A * sym + B))
        out.append(f"{state.arg[0]}' - (a*{state.arg[0]} + b) == 0 " + ("(sympy)" if ok else "FAILED (sympy)"))
    except (NotElementwise, RecursionError) as e:
        out.append(f"symbolic check skipped ({e if isinstance(e, NotElementwise) else 'too deep for sympy'})")
    err = _numeric(ir, [update], [a, b], lambda u, ab, S: lift(ab[0], state.rank) * S[state.id] + lift(ab[1], state.rank), [state])
    out.append(f"float64 spot check max err {err:.1e}")
    return out


def _numeric(ir, updates, coefs, model, states, seed=0) -> float:
    """max |update - model(coefs, states)| on random leaves (float64, batch of 3)."""
    import torch  # only when a numeric check runs: plain analyses do not import torch
    from ..torch_expr import compile_nodes
    leaves = list(ir.inputs.values()) + list(ir.params.values()) + ir.state_leaves()
    roots = list(updates) + [c for c in coefs if c is not None]
    fn = compile_nodes(roots, leaves)
    vals = random_leaves(leaves, ir.shape_of, seed=seed)
    # params carry a leading 1 like in the runtime; random values have batch 3 everywhere.
    res = fn(vals, 1, torch.float64, "cpu")
    ups, cs = res[:len(updates)], iter(res[len(updates):])
    cvals = [next(cs) if c is not None else (1.0 if i == 0 else 0.0) for i, c in enumerate(coefs)]
    S = {n.id: v for n, v in zip(leaves, vals)}
    pred = model(ups, cvals, S)
    preds = pred if isinstance(pred, list) else [pred]
    return max(max_err(u, p) for u, p in zip(ups, preds))


def _semiring_plan(ir, plan, an, s, sr, verify):
    import torch  # only when a numeric check runs: plain analyses do not import torch
    kind, a, b = sr
    name = "max-plus" if kind == "maxplus" else "log-sum-exp"
    coeffs = {"a": show(a), "b": show(b, "-inf")}
    checks = []
    if verify:
        state = ir.states[s]
        import sympy as sp
        sym = sp.Symbol(s, real=True)
        try:
            U = to_sympy(ir.updates[s], {state.id: sym}, True, depends=lambda n: n is state)
            A = to_sympy(a, {}, True)
            B = to_sympy(b, {}, True) if b is not None else None
            if kind == "maxplus":
                form = sp.Max(sym + A, B) if B is not None else sym + A
            else:
                form = sp.log(sp.exp(sym + A) + sp.exp(B)) if B is not None else sym + A
            ok = U == form or is_zero(U - form)
            checks.append(f"{s}' == {'max' if kind == 'maxplus' else 'logaddexp'}({s} + a, b) "
                          + ("(sympy)" if ok else "not proven symbolically"))
        except (NotElementwise, RecursionError) as e:
            checks.append(f"symbolic check skipped ({e if isinstance(e, NotElementwise) else 'too deep for sympy'})")
        fn = (lambda u, ab, S: torch.maximum(S[state.id] + lift(ab[0], state.rank), lift(ab[1], state.rank))) if kind == "maxplus" else \
            (lambda u, ab, S: torch.logaddexp(S[state.id] + lift(ab[0], state.rank), lift(ab[1], state.rank)))
        if b is not None:
            err = _numeric(ir, [ir.updates[s]], [a, b], fn, [state])
            checks.append(f"float64 spot check max err {err:.1e}")
        checks.append(f"combine of the {name} semiring is associative and composes steps (sympy)"
                      if combine_is_associative(kind) else "combine NOT proven associative")
    return plan(P.SEMIRING, name, f"{s}' = {'max' if kind == 'maxplus' else 'logaddexp'}({s} + a, b) "
                f"with a, b free of {s}", coefficients=coeffs, checks=checks, transition="elementwise",
                nodes={"kind": kind, "a": a, "b": b})


def _dense_semiring_plan(ir, plan, s, found, verify):
    """s' = (+)_j (s[j] (x) A[j, i]) (x) b[i] in the log or tropical semiring (linear.py's
    dense_semiring): HMM forward, Viterbi."""
    kind, A, b, transposed = found
    state = ir.states[s]
    name = "max-plus" if kind == "maxplus" else "log-sum-exp"
    red = "amax" if kind == "maxplus" else "logsumexp"
    dim = state.shape[0]
    coeffs = {"A[j, i]": show(A), "b": show(b)}
    checks = []
    if verify:
        import torch  # only when a numeric check runs: plain analyses do not import torch
        reduce = (lambda x: torch.amax(x, dim=-2)) if kind == "maxplus" else (lambda x: torch.logsumexp(x, dim=-2))

        def model(u, ab, S):
            return reduce(S[state.id][..., :, None] + lift(ab[0], 2)) + lift(ab[1], 1)
        err = _numeric(ir, [ir.updates[s]], [A, b], model, [state])
        checks.append(f"{s}' == {red}_j({s}[j] + A[j, i]) + b[i]: float64 spot check max err {err:.1e}")
        checks.append(f"the step is the {name} matrix-vector product with M = A + b[None, :]; the combine "
                      "M1 (x) M2 (semiring matrix product) is associative and composes steps (sympy, 2x2)"
                      if combine_is_associative(f"dense-{kind}", 2) else "combine NOT proven associative")
    spelled = f"{red}({s}[None, :] + A.T, axis=1)" if transposed else f"{red}({s}[:, None] + A, axis=0)"
    return plan(P.SEMIRING, f"{name}, dense transition [{dim}, {dim}]",
                f"{s}' = {spelled} + b with A, b free of {s}: {s}' = {s} (x) M, M = A + b[None, :], "
                f"a {name} matrix-vector product", coefficients=coeffs, checks=checks, transition="dense",
                nodes={"kind": kind, "A": A, "b": b, "transposed": transposed, "n": ir.shape_of(state)[0]})


def _lowrank_plan(ir, plan, s, a, low, offset, verify, leaves, updates):
    state = ir.states[s]
    kind = _decay_kind(a, state.shape)
    left_ok = all(t.scale is None or t.scale.rank == 0 or (t.scale.rank == 2 and t.scale.shape[1] == ONE)
                  for t in low)
    if not left_ok or kind == "elementwise" or state.rank != 2:
        return plan(P.DENSE, "", f"{s}' has rank-1 terms scaled along the value axis; not identity + low rank")
    us = {t.u.id for t in low}
    rank = len(us)
    gate = {"identity": "ungated", "scalar": "gated (scalar decay)", "vector": "diagonal decay (on keys)"}[kind]
    shown = low[:_MAX_SHOWN]  # an unrolled loop can make hundreds
    coeffs = {"decay": show(a, "1"),
              "updates": "; ".join(f"{show(t.scale, '1')} * outer({node_text(t.u)}, {node_text(t.w)} @ {s})"
                                   for t in shown) + (f"; ... ({len(low)} in all)" if len(low) > len(shown) else ""),
              "b": show(offset)}
    checks = []
    if verify:
        err = _lowrank_numeric(ir, state, a, low, offset)
        checks.append(f"{s}' == decay*{s} + sum scale*outer(u, w @ {s}) + b: float64 spot check max err {err:.1e}")
        checks.append("combine = composition of affine maps (matrix products) is associative (sympy)"
                      if combine_is_associative("lowrank") else "combine NOT proven associative")
    return plan(P.LOW_RANK, f"rank {rank}, {gate}", f"{s}' = decay * {s} + sum of rank-1 updates "
                f"outer(u, w @ {s}) plus free terms", coefficients=coeffs, checks=checks, rank=rank, decay=kind,
                nodes={"decay": a, "terms": low, "b": offset})


_MAX_SHOWN = 8  # rank-1 terms printed in a plan's coefficients


def _lowrank_numeric(ir, state, a, low, offset) -> float:
    import torch  # only when a numeric check runs: plain analyses do not import torch
    from ..torch_expr import compile_nodes
    leaves = list(ir.inputs.values()) + list(ir.params.values()) + ir.state_leaves()
    roots = [ir.updates[state.arg[0]]]
    for t in low:
        roots += [t.u, t.w] + ([t.scale] if t.scale is not None else [])
    if a is not None:
        roots.append(a)
    if offset is not None:
        roots.append(offset)
    fn = compile_nodes(roots, leaves)
    vals = random_leaves(leaves, ir.shape_of)
    res = iter(fn(vals, 1, torch.float64, "cpu"))
    upd = next(res)
    S_ = dict(zip([n.id for n in leaves], vals))[state.id]
    pred = 0
    for t in low:
        u, w = next(res), next(res)
        sc = lift(next(res), 2) if t.scale is not None else 1.0
        wS = (w[..., None, :] @ S_)[..., 0, :]
        pred = pred + sc * (u[..., :, None] * wS[..., None, :])
    dec = lift(next(res), 2) if a is not None else 1.0
    pred = pred + dec * S_
    if offset is not None:
        pred = pred + next(res)
    return max_err(upd, pred)


def _block_plan(ir, plan, states, forms, verify, leaves, updates):
    import torch  # only when a numeric check runs: plain analyses do not import torch
    k = len(states)
    coeffs = {}
    A = {}
    for i, si in enumerate(states):
        for t in forms[si].terms:
            j = states.index(t.state[0])
            A[(i, j)] = add(A.get((i, j)), t.scale if t.scale is not None else _one())
    for i, si in enumerate(states):
        coeffs[f"row {si}'"] = ", ".join(f"{states[j]}: {show(A.get((i, j)))}" for j in range(k)) + \
            f"; b: {show(forms[si].offset)}"
    checks = []
    if verify:
        leaf = {s: ir.states[s] for s in states}
        coefs = [A.get((i, j)) for i in range(k) for j in range(k)] + [forms[s].offset for s in states]
        present = [c for c in coefs if c is not None]
        r = ir.states[states[0]].rank

        def model(ups, cs, Sv):
            # cs are the non-None coefficients in order; rebuild the grid
            it = iter(cs)
            vals = [next(it) if c is not None else None for c in coefs]
            out = []
            for i in range(k):
                acc = 0
                for j in range(k):
                    c = vals[i * k + j]
                    if c is not None:
                        acc = acc + lift(c, r) * Sv[leaf[states[j]].id]
                b = vals[k * k + i]
                out.append(acc + (lift(b, r) if b is not None else 0))
            return out
        from ..torch_expr import compile_nodes
        leaves_all = list(ir.inputs.values()) + list(ir.params.values()) + ir.state_leaves()
        fn = compile_nodes([updates[s] for s in states] + present, leaves_all)
        vals = random_leaves(leaves_all, ir.shape_of)
        res = fn(vals, 1, torch.float64, "cpu")
        Sv = {n.id: v for n, v in zip(leaves_all, vals)}
        pred = model(res[:k], res[k:], Sv)
        err = max(max_err(u, p) for u, p in zip(res[:k], pred))
        checks.append(f"updates == A @ ({', '.join(states)}) + b: float64 spot check max err {err:.1e}")
        checks.append(f"combine (A2 A1, A2 b1 + b2) with {k}x{k} blocks is associative (sympy)"
                      if combine_is_associative("block", k) else "combine NOT proven associative")
    return plan(P.BLOCK_DIAGONAL, f"{k}x{k} blocks", f"each of {', '.join(s + chr(39) for s in states)} is an "
                f"elementwise combination of {', '.join(states)}: per element a {k}x{k} matrix",
                coefficients=coeffs, checks=checks, block=k,
                nodes={"A": A, "b": {s: forms[s].offset for s in states}})


def _check_affine(ir, leaves, updates) -> list[str]:
    """Numerically: f(t*S1 + (1-t)*S2) == t*f(S1) + (1-t)*f(S2)."""
    import torch  # only when a numeric check runs: plain analyses do not import torch
    from ..torch_expr import compile_nodes
    leaves_all = list(ir.inputs.values()) + list(ir.params.values()) + ir.state_leaves()
    ups = list(updates.values())
    fn = compile_nodes(ups, leaves_all)
    v1 = random_leaves(leaves_all, ir.shape_of, seed=1)
    v2 = random_leaves(leaves_all, ir.shape_of, seed=2)
    ids = {n.id for n in leaves}
    t = 0.3
    mixed = [(t * a + (1 - t) * b) if n.id in ids else a for n, a, b in zip(leaves_all, v1, v2)]
    v2 = [b if n.id in ids else a for n, a, b in zip(leaves_all, v1, v2)]
    f1, f2, fm = fn(v1, 1, torch.float64, "cpu"), fn(v2, 1, torch.float64, "cpu"), fn(mixed, 1, torch.float64, "cpu")
    err = max(max_err(m, t * a + (1 - t) * b) for m, a, b in zip(fm, f1, f2))
    return [f"affine in the stage's states: float64 spot check max err {err:.1e}"]


def _nonlinear_plan(ir, plan, an, states, updates, degs):
    bad = next(s for s, d in degs.items() if d == NONLINEAR)
    culprit = _first_nonlinear(an, updates[bad])
    mixes = {s: an.mixing(u) for s, u in updates.items()}
    shapes = {tuple(ir.states[s].shape) for s in states}
    local = None if all(m != "DENSE" for m in mixes.values()) else local_axis(ir, states, updates)
    if all(m != "DENSE" for m in mixes.values()) and len(shapes) == 1:
        jac = "diagonal" if len(states) == 1 else f"block-diagonal (k={len(states)})"
        why_j = "every update is elementwise in the states"
    elif local is not None:
        rows, cols = ir.shape_of(ir.states[states[0]])
        n_blocks, size = (cols, rows) if local == 1 else (rows, cols)
        along = "column" if local == 1 else "row"
        jac = f"block-diagonal by {along}s ({n_blocks} blocks of {size}x{size})"
        why_j = (f"{along} j of {', '.join(s + chr(39) for s in states)} reads {along} j of "
                 f"{', '.join(states)} only")
    else:
        s_dense = next(s for s, m in mixes.items() if m == "DENSE") if any(m == "DENSE" for m in mixes.values()) \
            else states[0]
        node = an.first_dense(updates[s_dense])
        jac = "dense"
        why_j = (f"{node_text(node)} (line {node.span.line}) mixes state elements" if node is not None and node.span
                 else "states of different shapes interact")
    reason = f"{bad}' applies {culprit} to the state"
    return plan(P.NONLINEAR, f"{jac} Jacobian", reason, jacobian=jac, jacobian_reason=why_j,
                block=len(states) if jac.startswith("block") else None)


def _first_nonlinear(an: StageAnalysis, n: Node) -> str:
    for x in toposort([n]):
        if an.degree(x) == NONLINEAR and all(an.degree(s) <= AFFINE for s in x.srcs):
            where = f" (line {x.span.line})" if x.span else ""
            if x.op in (Op.MUL, Op.MATMUL, Op.OUTER, Op.DOT, Op.DIV):
                return f"a product of two state-dependent values, {node_text(x)}{where},"
            return f"{written_function(x) or x.op.name.lower()}{where}"
    return "a nonlinearity"  # pragma: no cover


def written_function(n: Node) -> str | None:
    """The function the user wrote where n came from (`clamp` for the max it lowers to),
    read from n's span in the .rec text; None when the span is not a call."""
    sp = n.span
    if sp is None or sp.source is None or sp.end_line != sp.line:
        return None
    m = re.match(r"([A-Za-z_]\w*)\s*\(", sp.source.line(sp.line)[sp.col - 1:sp.end_col - 1])
    return m.group(1) if m else None


# --------------------------------------------------------------------------- readouts

def _readouts(ir: IRCell, stage_list, place) -> list[P.OutputPlan]:
    out = []
    stage_of = {s: k for k, st in enumerate(stage_list) for s in st}
    reads = S.state_reads(ir)
    for name, node in ir.outputs.items():
        ks = sorted({stage_of[s] for s in reads[node.id]})
        if not ks:
            out.append(P.OutputPlan(name, "hoisted", [], "reads no state"))
            continue
        # Linear jointly in every state it reads (previous and new values): a readout.
        st = [s for k in ks for s in stage_list[k]]
        stop = {ir.updates[s].id: ir.updates[s] for s in st}
        an = StageAnalysis(_stage_leaves(ir, st), stop)
        d = an.degree(node)
        if d <= AFFINE:
            if node.id in stop:
                detail = f"the new state {node_text(node)}"
            else:
                detail = f"linear in {', '.join(st)}; fusable into the stage's kernel"
            out.append(P.OutputPlan(name, "linear readout", ks, detail))
        else:
            out.append(P.OutputPlan(name, "epilogue", ks, f"nonlinear in {', '.join(st)}: computed after the stage"))
    return out


__all__ = ["analyze", "verify", "has_outer", "log_form", "FREE", "mul"]
