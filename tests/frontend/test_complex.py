"""Complex values (docs/LANGUAGE.md, "Complex values"): the `complex` declarations, the
literal `1j`, the builtins real/imag/conj/complex and exp/abs/+ - * / @ on complex values;
how they check (types, located errors where a value cannot be complex), how they lower (a
complex state `h` is two real states `h.re`, `h.im`; a complex param one real param with a
trailing axis of 2), what the analysis sees (a complex diagonal is a 2x2 block per element),
and the numbers: a cell with a complex state against a hand-written torch complex128 loop
on the reference and torch backends (outputs, final states as (re, im), gradients of the
complex params' parts)."""
from __future__ import annotations

import re

import pytest

from recdsl import RecError, load, parse_and_check
from recdsl import plan as PL
from recdsl.ir import Op
from recdsl.parser import parse
from recdsl.printer import to_source
from recdsl.types import fmt_shape

# ---------------------------------------------------------------------------- syntax

SUGAR = """cell Z(D, N):
    input x[D], g[N]
    param L[N] complex = -0.5 + 1j * arange(N)
    param B[N, D] complex ~ normal(0, 0.5)
    param W[N, D] ~ normal(0, 0.5)
    state h[N] complex = 0
    v = B @ x + 2.5e-1J * (W @ x)
    w = complex(g, -g) / (1 + 0.5j)
    h' = exp(L * 0.1) * h + conj(v) - w
    output y = real(h') + imag(h') * abs(v)
"""


def test_the_sugar_parses_prints_and_round_trips():
    tree = parse(SUGAR)
    decls = {v.name: v for item in tree.cells[0].items if hasattr(item, "vars") for v in item.vars}
    assert decls["L"].complex and decls["B"].complex and decls["h"].complex and not decls["W"].complex
    printed = to_source(tree)
    assert "param  L[N] complex = -0.5 + 1j * arange(N)" in printed
    assert "state  h[N] complex = 0" in printed and "2.5e-1J * (W @ x)" in printed
    assert parse(printed) == tree and to_source(parse(printed)) == printed


def test_complex_is_still_a_function_and_a_soft_keyword():
    # `complex` after a declaration's shape is the flag; in an expression, the builtin
    (cell,) = parse_and_check("cell A(N):\n    input a[N]\n    state s[N] complex\n"
                              "    s' = s + complex(a, a)\n    output y = real(s')\n")
    assert cell.states["s"].type.is_complex


# ---------------------------------------------------------------------------- types

def test_types_and_summary():
    (cell,) = parse_and_check(SUGAR)
    assert "params   L[N] complex, B[N, D] complex, W[N, D]" in cell.summary()
    assert "states   h[N] complex" in cell.summary()
    loc = cell.locals
    assert loc["v"].type.is_complex and fmt_shape(loc["v"].shape) == "[N]"
    assert loc["w"].type.is_complex
    assert not cell.outputs[0].type.is_complex


@pytest.mark.parametrize("expr, shape, cplx", [
    ("z", "[N]", True), ("real(z)", "[N]", False), ("imag(z)", "[N]", False), ("conj(z)", "[N]", True),
    ("abs(z)", "[N]", False), ("exp(z)", "[N]", True), ("z * a", "[N]", True), ("a / z", "[N]", True),
    ("Z @ z", "[M]", True), ("Wr @ z", "[M]", True), ("Z @ a", "[M]", True), ("dot(z, a)", "[]", True),
    ("outer(z, a)", "[N, N]", True), ("sum(z)", "[]", True), ("mean(z)", "[]", True), ("z[0:2]", "[2]", True),
    ("concat(z, a)", "[2*N]", True), ("Z.T", "[N, M]", True), ("where(a > 0, z, a)", "[N]", True),
    ("diag(z)", "[N, N]", True), ("reshape(Z, [N, M])", "[N, M]", True), ("1j", "[]", True),
    ("complex(a, 1.0)", "[N]", True), ("real(a)", "[N]", False), ("z[:, None] * a", "[N, N]", True),
])
def test_complex_expression_types(expr, shape, cplx):
    src = ("cell A(N, M) where N >= 2:\n    input a[N]\n    param Z[M, N] complex ~ normal(0, 1)\n"
           "    param Wr[M, N] ~ normal(0, 1)\n    param z[N] complex ~ normal(0, 1)\n"
           f"    e = {expr}\n    output y = a\n")
    (cell,) = parse_and_check(src)
    ty = cell.locals["e"].type
    assert (fmt_shape(ty.shape), ty.is_complex) == (shape, cplx)


# ---------------------------------------------------------------------------- located errors

CELL = "cell A(N):\n    input a[N]\n    param z[N] complex ~ normal(0, 1)\n    state h[N] = 0\n"


def err(src: str) -> RecError:
    with pytest.raises(RecError) as info:
        parse_and_check(src, "c.rec")
    return info.value


@pytest.mark.parametrize("line, line_col, message, hint", [
    # comparisons of complex values
    ("    m = where(z > a, a, 0 * a)\n", (5, 15), "'>' compares real values; this side is complex", "abs(z)"),
    ("    m = where(a == 1j, a, a)\n", (5, 20), "'==' compares real values", "complex numbers are not ordered"),
    # a complex value where a real one is required
    ("    output o = z * a\n", (5, 16), "output o is complex; outputs are real tensors", "real(...)"),
    ("    h' = h + 1j * a\n", (5, 10), "h' is complex, but state h is real", "state h[N] complex = 0"),
    ("    m = sigmoid(z)\n", (5, 17), "sigmoid is defined on real values; this argument is complex", "real(z)"),
    ("    m = max(z, a)\n", (5, 13), "max is defined on real values", "abs(z)"),
    ("    m = softmax(z)\n", (5, 17), "softmax is defined on real values", "real(z)"),
    ("    m = amax(z)\n", (5, 14), "amax is defined on real values", "abs(z)"),
    ("    m = z ** 2\n", (5, 9), "'**' is not defined on complex values", "z * z"),
    ("    m = complex(z, a)\n", (5, 17), "complex(re, im) takes two real values; this one is complex", "1j * im"),
    ("    m = inv(diag(z))\n", (5, 13), "inv takes real matrices; this argument is complex", "exp(Lambda * dt)"),
    ("    m = z.real\n", (5, 9), ".real is not an attribute", "real(z)"),
    ("    m = angle(z)\n", (5, 9), "angle(...) is not in the language", "exp(1j * theta)"),
    # 1j where no value can be complex: sizes, indices, loop counts
    ("    m = a[1j]\n", (5, 11), "an index must be an integer expression", "literals"),
    ("    m = concat(a[0:1j], a)\n", (5, 20), "a slice bound must be an integer expression", "literals"),
])
def test_complex_errors_are_located(line, line_col, message, hint):
    tail = "" if "h'" in line else "    h' = h\n"
    out = "" if "output" in line else "    output y = a\n"
    e = err(CELL + line + tail + out)
    assert (e.line, e.col) == line_col, str(e)
    assert message in e.message, str(e)
    assert hint in (e.hint or ""), str(e)


@pytest.mark.parametrize("src, line_col, message", [
    ("cell A(N, c=1j):\n    input a[N]\n    output y = a\n", (1, 13), "the default of c is complex"),
    ("cell A(N):\n    input a[N] complex\n    output y = a\n", (2, 16), "input a cannot be complex"),
    ("cell A(N):\n    input a[1j]\n    output y = a\n", (2, 13), "a dimension of a must be an integer"),
    ("cell A(N):\n    input a[N]\n    param w[N] = 1j\n    output y = a * w\n", (3, 18),
     "the initial value of w is complex, but param w is real"),
    ("cell A(N):\n    input a[N]\n    param z[N] complex = 1j\n    state h[N] = z\n    h' = h\n    output y = a\n",
     (4, 18), "the initial value of h is complex, but state h is real"),
    ("cell A(N):\n    over dag\n    input a[N]\n    state h[N] complex = 0\n    h' = sum_in(h)\n    output y = a\n",
     (4, 16), "a complex state runs over seq only"),
    ("cell A(N):\n    input a[N]\n    acc = 0 * a\n    for j in range(2):\n        acc = acc + 1j * a\n"
     "    output y = a + acc\n", (5, 9), "acc is rebound with a complex value, but it was real"),
    ("cell A(N):\n    input a[N]\n    for j in range(1j):\n        b = a\n    output y = a\n", (3, 20),
     "the loop count must be an integer"),
    ("cell A(N):\n    input a[N]\n    param w[N] complex ~ normal(1j, 1)\n    output y = a * real(w)\n", (3, 33),
     "an argument of normal() must be a real scalar"),
])
def test_complex_declaration_errors(src, line_col, message):
    e = err(src)
    assert (e.line, e.col) == line_col, str(e)
    assert message in e.message, str(e)


def test_the_golden_names_the_state_to_declare_complex():
    e = err("cell Rot(N):\n    input x[N]\n    state h[N] = 0\n    h' = (0.9 + 0.1j) * h + x\n    output h'\n")
    assert (e.line, e.col) == (4, 10) and "state h[N] complex = 0" in e.hint


# ---------------------------------------------------------------------------- lowering

def test_lowering_makes_real_pairs():
    spec = load(SUGAR)
    ir = spec.lower(D=3, N=4)
    assert set(ir.states) == {"h.re", "h.im"} and ir.complex_states == {"h": ("h.re", "h.im")}
    assert set(ir.updates) == {"h.re", "h.im"} and ir.complex_params == {"L", "B"}
    assert [str(d) for d in ir.params["L"].shape] == ["N", "2"]
    assert [str(d) for d in ir.params["W"].shape] == ["N", "D"]
    names = {n.name for n in ir.nodes()}
    assert {"L.re", "L.im", "B.re", "B.im", "v.re", "v.im", "w.re", "w.im", "h.re'", "h.im'"} <= names
    assert all(not isinstance(getattr(n, "arg", None), complex) for n in ir.nodes())   # the IR is real
    # a literal's zero part is folded away: 2.5e-1J * (W @ x) is one real product, not 0 * (W @ x) too
    assert not any(n.op == Op.MUL and any(s.op == Op.CONST and s.arg == 0.0 for s in n.srcs) for n in ir.nodes())


def test_a_real_value_promotes():
    spec = load("cell A(N):\n    input a[N]\n    state h[N] complex = 2\n    h' = a\n"
                "    output y = imag(h') + real(h)\n")
    ir = spec.lower(N=3)
    assert ir.updates["h.im"].op == Op.EXPAND and ir.updates["h.im"].srcs[0].arg == 0.0


# ---------------------------------------------------------------------------- the analysis

S5_LIKE = """cell S(H, P):
    input u[H]
    param Lambda[P] complex = -0.5 + 1j * arange(P)
    param B[P, H] complex ~ normal(0, 0.5)
    param C[H, P] complex ~ normal(0, 0.5)
    param log_step[P] = -2.0
    state x[P] complex = 0
    Lambda_bar = exp(Lambda * exp(log_step))
    B_bar = ((Lambda_bar - 1) / Lambda)[:, None] * B
    x' = Lambda_bar * x + B_bar @ u
    output y = real(C @ x')
"""


def test_a_complex_diagonal_is_a_2x2_block_per_element():
    plan = load(S5_LIKE).plan()
    assert plan.classes() == {"x.re": PL.BLOCK_DIAGONAL, "x.im": PL.BLOCK_DIAGONAL}
    (stage,) = plan.stages
    assert stage.block == 2 and stage.states == ["x.re", "x.im"]
    assert plan.outputs[0].kind == "linear readout"
    text = str(plan)
    assert "stage 0: x.re, x.im (line 10): block-diagonal affine, 2x2 blocks" in text
    # the coefficients read in the complex form they came from, not as their real expansion
    assert "row x.re' = x.re: Lambda_bar.re, x.im: -Lambda_bar.im; b: (B_bar @ u).re" in text
    assert "row x.im' = x.re: Lambda_bar.im, x.im: Lambda_bar.re; b: (B_bar @ u).im" in text
    assert max(len(line) for line in text.splitlines() if "row " in line) < 120


def test_unnamed_complex_values_show_their_source_text():
    lines = S5_LIKE.splitlines(keepends=True)
    src = "".join(lines[:7]) + "    x' = exp(Lambda * exp(log_step)) * x + B @ u\n" + "".join(lines[10:])
    text = str(load(src).plan())
    assert "row x.re' = x.re: exp(Lambda * exp(log_step)).re, x.im: -exp(Lambda * exp(log_step)).im; " \
           "b: (B @ u).re" in text


# ---------------------------------------------------------------------------- the numbers

NUMERIC = """cell CRot(D, N):
    input x[D], g[N]
    param nu[N] ~ uniform(-1.0, -0.1)
    param theta[N] ~ uniform(0.0, 3.0)
    param B[N, D] complex ~ normal(0, 0.5)
    param C[D, N] complex ~ normal(0, 0.5)
    param W[N, D] ~ normal(0, 0.5)
    param h0[N] complex ~ normal(0, 1)
    state h[N] complex = h0
    lam = exp(complex(nu, theta + 0.1 * g))
    v = B @ x + 1j * (W @ x)
    h' = lam * h + v / (1 + 0.5j)
    output y = real(C @ h') + imag(conj(C) @ h')
    output m = abs(h') + real(sum(h' * h'))
"""


def _oracle(torch, layer, xs, Tn):
    """The cell's equations in torch complex128, from the layer's parameters (autograd on the
    real parts of the complex params, which are separate leaves here)."""
    P = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    cx = {n: torch.complex(P[n][..., 0], P[n][..., 1]) for n in ("B", "C", "h0")}
    x, g = xs["x"], xs["g"]
    h = cx["h0"].expand(x.shape[0], -1)
    ys, ms = [], []
    for t in range(Tn):
        lam = torch.exp(torch.complex(P["nu"], P["theta"] + 0.1 * g[:, t]))
        v = x[:, t].to(torch.complex128) @ cx["B"].T + 1j * (x[:, t] @ P["W"].T)
        h = lam * h + v / (1 + 0.5j)
        ys.append((h @ cx["C"].T).real + (h @ cx["C"].conj().T).imag)
        ms.append(h.abs() + (h * h).sum(-1, keepdim=True).real)
    return torch.stack(ys, 1), torch.stack(ms, 1), h, P


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_complex_state_matches_a_complex128_loop(backend):
    torch = pytest.importorskip("torch")
    spec = load(NUMERIC)
    assert spec.plan().classes() == {"h.re": PL.BLOCK_DIAGONAL, "h.im": PL.BLOCK_DIAGONAL}
    torch.manual_seed(0)
    layer = spec(backend=backend, D=3, N=4).double()
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "nu": (4,), "theta": (4,), "B": (4, 3, 2), "C": (3, 4, 2), "W": (4, 3), "h0": (4, 2)}
    gen = torch.Generator().manual_seed(1)
    Tn = 6
    xs = {"x": torch.randn(2, Tn, 3, dtype=torch.float64, generator=gen),
          "g": torch.randn(2, Tn, 4, dtype=torch.float64, generator=gen)}
    (y, m), st = layer(**xs)
    want_y, want_m, h, P = _oracle(torch, layer, xs, Tn)
    assert set(st) == {"h.re", "h.im"}
    assert torch.allclose(y, want_y, atol=1e-10) and torch.allclose(m, want_m, atol=1e-10)
    assert torch.allclose(st["h.re"], h.real, atol=1e-10) and torch.allclose(st["h.im"], h.imag, atol=1e-10)
    # gradients of a loss of outputs and final state, for every param (the complex ones' parts)
    loss = (y ** 2).sum() + m.sum() + (st["h.re"] * 0.3 - st["h.im"]).sum()
    loss.backward()
    want = (want_y ** 2).sum() + want_m.sum() + (h.real * 0.3 - h.imag).sum()
    want.backward()
    for name, p in layer.named_parameters():
        assert torch.allclose(p.grad, P[name].grad, atol=1e-9), name
    # continuing from the returned state is the same as running on
    (y1, _), st1 = layer(**{k: v[:, :3] for k, v in xs.items()})
    (y2, _), st2 = layer(**{k: v[:, 3:] for k, v in xs.items()}, state=st1)
    assert torch.allclose(torch.cat([y1, y2], 1), y, atol=1e-12)
    # and one step at a time (step(), for decoding)
    state = None
    for t in range(Tn):
        (yt, _), state = layer.step(x=xs["x"][:, t], g=xs["g"][:, t], state=state)
        assert torch.allclose(yt, y[:, t], atol=1e-12)


def test_complex_initialisers_and_view_as_complex():
    torch = pytest.importorskip("torch")
    spec = load("cell A(N):\n    input a[N]\n    param L[N] complex = -0.5 + 1j * 3.0 * arange(N)\n"
                "    param r[N] complex = 2\n    state h[N] complex = 1 - 2j\n    h' = L * h + r\n"
                "    output y = real(h')\n")
    layer = spec(backend="reference", N=3).double()
    L = torch.view_as_complex(layer.L.detach())
    assert torch.equal(L, torch.tensor([-0.5 + 0j, -0.5 + 3j, -0.5 + 6j], dtype=torch.complex128))
    assert torch.equal(torch.view_as_complex(layer.r.detach()), torch.full((3,), 2 + 0j, dtype=torch.complex128))
    st = layer.initial_state(2, torch.float64)
    assert torch.equal(st["h.re"], torch.ones(2, 3, dtype=torch.float64)) and torch.equal(st["h.im"], -2 * st["h.re"])
    heads = load("cell A(N, NH):\n    heads NH\n    input a[N]\n    param L[N] complex ~ normal(0, 1)\n"
                 "    output y = real(L * a)\n")(backend="reference", N=3, NH=2)
    assert tuple(heads.L.shape) == (2, 3, 2)


def test_complex_state_names_are_valid_and_distinct_in_generated_code():
    """`h.re` is `s___re_h` in generated Python (recdsl.torch_expr.user_name): no user name can be
    that, so a real state next to it named `re_h` or `h_re` keeps its own value."""
    torch = pytest.importorskip("torch")
    from recdsl.backends import reference
    src = ("cell A(N):\n    input a[N]\n    state h[N] complex = 0\n    state re_h[N] = 0\n    state h_re[N] = 0\n"
           "    h' = (0.5 + 0.5j) * h + a\n    re_h' = 0.5 * re_h + real(h)\n    h_re' = 0.5 * h_re + imag(h)\n"
           "    output y = re_h' + 2 * h_re'\n")
    spec = load(src)
    code = reference.emit_step(spec.lower(N=3))
    compile(code, "step", "exec")
    assert "s___re_h" in code and "s_re_h" in code and "s_h_re" in code
    a = torch.randn(2, 5, 3, dtype=torch.float64)
    outs = []
    for backend in ("reference", "torch"):
        layer = spec(backend=backend, N=3).double()
        y, st = layer(a=a)
        outs.append(y)
    h = torch.zeros(2, 3, dtype=torch.complex128)
    re_h = h_re = torch.zeros(2, 3, dtype=torch.float64)
    ys = []
    for t in range(5):
        re_h, h_re = 0.5 * re_h + h.real, 0.5 * h_re + h.imag
        h = (0.5 + 0.5j) * h + a[:, t]
        ys.append(re_h + 2 * h_re)
    for y in outs:
        assert torch.allclose(y, torch.stack(ys, 1), atol=1e-12)


def _generated_texts(spec):
    from recdsl.backends import reference
    from recdsl.pipeline import backend_module, plan_cell
    ir = spec.lower(**spec.analysis_dims())
    plan = plan_cell(ir, verify=False)
    texts = {"reference": reference.emit_step(ir)}
    for b in ("torch", "triton"):
        emitted = backend_module(b).emit(plan, plan.selections[b])
        source, em = emitted[-2:]
        if b == "triton":
            texts["triton kernels"] = emitted[0]
        texts[b] = source
        texts.update({f"{b} C loop {i}": fl.source for i, fl in enumerate(em.fused)})
    return texts


def test_generated_python_and_c_are_valid():
    texts = _generated_texts(load(S5_LIKE))
    for label, text in texts.items():
        if "C loop" in label:   # C names values by number: no state name reaches it
            assert not re.search(r"\bx\.(re|im)\b", re.sub(r"/\*.*?\*/", "", text, flags=re.S)), label
        elif label != "triton kernels":
            compile(text, label, "exec")


def test_generated_triton_kernels_are_valid():
    compile(_generated_texts(load(S5_LIKE))["triton kernels"], "triton kernels", "exec")
