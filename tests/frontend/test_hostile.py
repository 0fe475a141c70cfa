"""Hostile inputs (issue 12, parts 5-7): every one is a RecError located at the construct
responsible (asserted on the span's line and column, not on prose), found before anything is
unrolled or allocated, and fast.

- long and absurd `for` loops: a bound on what the loops unroll into (RECDSL_MAX_UNROLL),
  checked from literals at check time and from the dims when they are given; the analysis
  walks long chains without recursion;
- absurd dimensions and sizes (a dim of 10**20, a [D, D, D] input with D = 10**5);
- constants that are not finite real numbers (1e999, 10**400, log(0), sqrt(-1), ...) and bad
  distribution bounds, at check time;
- names that would collide with the compiled module's Python API."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

import recdsl
from recdsl import RecError
from recdsl.builtins import LAYER_API, MODULE_API, SPEC_OPTIONS, TORCH_MODULE_API
from recdsl.spec import load

from .corpus import REPO


def located(fn, *args, **kw) -> RecError:
    with pytest.raises(RecError) as info:
        fn(*args, **kw)
    err = info.value
    assert err.span is not None, f"no location: {err}"
    return err


def col(src: str, line: int, text: str, nth: int = 0) -> int:
    """1-based column of the nth occurrence of text on a 1-based line of src."""
    ln = src.split("\n")[line - 1]
    at = -1
    for _ in range(nth + 1):
        at = ln.index(text, at + 1)
    return at + 1


def at(err: RecError, src: str, line: int, text: str, nth: int = 0):
    assert (err.span.line, err.span.col) == (line, col(src, line, text, nth)), str(err)


CHAIN = """cell Chain(D):
    input x[D]
    state h[D] = 0
    acc = x
    for j in range({n}):
        acc = acc * 0.5 + x
    h' = h * 0.9 + acc
    output h'
"""


# --------------------------------------------------------------------------- part 5: for loops

def test_a_long_for_within_the_limit_checks_and_runs_on_the_reference_backend():
    import torch
    n = 2000  # 2 operations a pass: 4000 <= 4096
    spec = load(CHAIN.format(n=n))
    spec.plan()
    layer = spec(backend="reference", D=3)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    y, st = layer.double()(x=x)
    acc = x.clone()
    for _ in range(n):
        acc = acc * 0.5 + x
    h = torch.zeros(2, 3, dtype=torch.float64)
    want = []
    for t in range(4):
        h = h * 0.9 + acc[:, t]
        want.append(h)
    assert torch.allclose(y, torch.stack(want, 1))


@pytest.mark.parametrize("update", [
    "acc = acc * g + x",            # affine in the state: coefficients are 2000-node chains
    "acc = tanh(acc * g + x)",      # nonlinear: a 4000-deep chain of elementwise ops
    "acc = max(acc + g, x)",        # max-plus
    "acc = acc + x",                # a long sum (reassociation)
])
def test_the_analysis_of_a_long_chain_does_not_recurse(update):
    from recdsl.analysis import analyze
    src = ("cell Long(D):\n    input x[D], g[D]\n    state h[D] = 0\n    acc = h\n"
           f"    for j in range(1300):\n        {update}\n    h' = acc\n    output h'\n")
    ir = load(src).lower(D=3)
    analyze(ir, verify=False)  # warm up imports before the stack is made small
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)  # any walk that recursed per node would fail here
    try:
        plan = analyze(ir, verify=True)
    finally:
        sys.setrecursionlimit(limit)
    assert plan.stages and all("FAILED" not in c for s in plan.stages for c in s.checks)


def test_deltaproduct_many_steps_analyses_in_time():
    # every pass reads the accumulator twice: the affine form's terms must not double per pass
    from recdsl.analysis import analyze
    ir = load("deltaproduct").lower(K=4, V=4, NH=64)
    t = time.perf_counter()
    plan = analyze(ir, verify=True)
    assert time.perf_counter() - t < 20
    assert plan.stages[0].rank == 64


def test_a_literal_loop_over_the_limit_is_refused_at_check_time():
    for n in ("100000", "10**9"):
        src = CHAIN.format(n=n)
        t = time.perf_counter()
        err = located(load, src)
        assert time.perf_counter() - t < 2
        at(err, src, 5, "for")
        assert "4096" in err.message and "RECDSL_MAX_UNROLL" in err.hint


def test_a_loop_over_a_dimension_is_bounded_when_the_dims_are_given():
    src = CHAIN.format(n="D")
    spec = load(src)  # the count is not known yet
    t = time.perf_counter()
    at(located(spec.plan, D=100000), src, 5, "for")
    at(located(spec, backend="reference", D=100000), src, 5, "for")
    assert time.perf_counter() - t < 2
    spec.plan(D=100)


def test_nested_loops_multiply():
    src = ("cell N(D):\n    input x[D]\n    state h[D] = 0\n    acc = x\n    for j in range(D):\n"
           "        for i in range(100):\n            acc = acc * 0.5 + x\n    h' = h + acc\n    output h'\n")
    at(located(load(src).plan, D=100), src, 5, "for")
    src2 = src.replace("range(D)", "range(3)").replace("range(100)", "range(10000)")
    at(located(load, src2), src2, 6, "for")  # the inner loop alone is over the limit


def test_loops_add_up():
    body = "    for j in range(1500):\n        acc = acc * 0.5 + x\n"
    src = ("cell A(D):\n    input x[D]\n    state h[D] = 0\n    acc = x\n" + body + body
           + "    h' = h + acc\n    output h'\n")
    at(located(load, src), src, 7, "for")  # 3000 + 3000: the second loop passes 4096


def test_the_limit_is_configurable(monkeypatch):
    src = CHAIN.format(n=60)
    load(src)
    monkeypatch.setenv("RECDSL_MAX_UNROLL", "100")
    err = located(load, src)
    at(err, src, 5, "for")
    assert "100" in err.message
    monkeypatch.setenv("RECDSL_MAX_UNROLL", "20000")
    load(CHAIN.format(n=9000)).lower(D=2)
    monkeypatch.setenv("RECDSL_MAX_UNROLL", "lots")
    with pytest.raises(RecError, match="RECDSL_MAX_UNROLL"):
        load(src)


def test_deltaproduct_with_an_absurd_nh_fails_fast_and_located():
    spec = load("deltaproduct")
    text = spec.source_text
    t = time.perf_counter()
    err = located(spec, K=4, V=4, NH=10**20)
    at(err, text, 2, "NH")  # the dimension in the cell line
    err = located(spec.plan, K=4, V=4, NH=10**6)
    at(err, text, 7, "for")
    assert time.perf_counter() - t < 2


# --------------------------------------------------------------------------- part 5: sizes

SMALL = "cell S(D):\n    input x[D]\n    state h[D] = 0\n    h' = h + {expr}\n    output h'\n"


def test_an_absurd_dimension_is_refused_at_its_declaration():
    src = SMALL.format(expr="x")
    spec = load(src)
    for value in (10**20, 2**31):
        at(located(spec, D=value), src, 1, "D")
        at(located(spec.plan, D=value), src, 1, "D")
    spec.plan(D=2**20)


def test_absurd_sizes_are_refused_where_they_arise():
    src = "cell S(D):\n    input x[D, D, D]\n    state h[D] = 0\n    h' = h + sum(sum(x))\n    output h'\n"
    at(located(load(src).plan, D=10**5), src, 2, "x")
    src = SMALL.format(expr="outer(x, x) @ x")
    at(located(load(src).plan, D=10**5), src, 4, "outer")
    src = SMALL.format(expr="x @ eye(D)")
    at(located(load(src).plan, D=10**5), src, 4, "eye")
    src = SMALL.format(expr="x * sum(arange(D*D*D))")
    at(located(load(src).plan, D=10**5), src, 4, "arange")
    # literal sizes: at check time
    src = "cell S(D):\n    input x[100000, 100000]\n    state h[D] = 0\n    h' = h + x[0, :D]\n    output h'\n"
    at(located(load, src), src, 2, "x")
    src = SMALL.format(expr="x * sum(arange(10**12))")
    at(located(load, src), src, 4, "arange")
    src = "cell S(D, N=100000000000000000000):\n    input x[D]\n    state h[D] = 0\n    h' = h + x\n    output h'\n"
    at(located(load, src), src, 1, "1000")
    src = "cell S(D, N=0):\n    input x[D]\n    state h[D] = 0\n    h' = h + x\n    output h'\n"
    at(located(load, src), src, 1, "0")


# --------------------------------------------------------------------------- part 6: constants

HYPER = "cell H(D, a={v}):\n    input x[D]\n    state h[D] = 0\n    h' = h * a + x\n    output h'\n"


@pytest.mark.parametrize("value", ["1e999", "nan", "inf", "2.0**1024", "10**400", "(-8)**0.5", "log(0)", "sqrt(-1)",
                                   "exp(1000)", "1/0", "0**-1", "log(-1)", "1" + "0" * 400, "exp(exp(10))",
                                   "2 * 1e308", "1e308 + 1e308", "rsqrt(0)"])
def test_bad_hyper_parameter_defaults_are_located_at_check_time(value):
    src = HYPER.format(v=value)
    err = located(load, src)
    assert err.span.line == 1 and col(src, 1, "a=") + 2 <= err.span.col < col(src, 1, "):")


@pytest.mark.parametrize("init, culprit", [
    ("~ uniform(1, 0)", "uniform"),
    ("~ normal(0, -1)", "-1"),
    ("~ normal(0, std=-0.5)", "-0.5"),
    ("~ normal(0, 1e999)", "1e999"),
    ("~ uniform(0, exp(800))", "exp"),
    ("= log(0)", "log"),
    ("= sqrt(-2) * 3", "sqrt"),
    ("= 10.0**400", "10.0"),
    ("= log(arange(4))[0]", "log"),   # not an initialiser form: the runtime could not build it
    ("= softplus(1.0)", "softplus"),  # idem
])
def test_bad_initialisers_are_located_at_check_time(init, culprit):
    src = f"cell I(D):\n    input x[D]\n    param w[D] {init}\n    state h[D] = 0\n    h' = h * w + x\n    output h'\n"
    at(located(load, src), src, 3, culprit)


def test_bad_initialisers_of_vectors_and_states():
    src = ("cell I(D):\n    input x[D]\n    param w[4] = log(arange(4)) * 2\n    state h[D] = 0\n"
           "    h' = h * w[0] + x\n    output h'\n")
    at(located(load, src), src, 3, "log")
    src = ("cell I(D):\n    input x[D]\n    param w[D] = log(arange(D))\n    state h[D] = 0\n"
           "    h' = h * w + x\n    output h'\n")
    spec = load(src)  # D is not known yet
    at(located(spec.plan), src, 3, "log")
    src = "cell I(D):\n    input x[D]\n    state h[D] = exp(1000)\n    h' = h + x\n    output h'\n"
    at(located(load, src), src, 3, "exp")


def test_distribution_bounds_from_dims_are_checked_when_the_dims_are_given():
    src = ("cell U(D):\n    input x[D]\n    param w[D] ~ uniform(1/D, 1/(D*D))\n    state h[D] = 0\n"
           "    h' = h * w + x\n    output h'\n")
    spec = load(src)
    at(located(spec.plan, D=4), src, 3, "uniform")
    at(located(spec, backend="reference", D=4), src, 3, "uniform")
    spec.plan(D=1)


def test_constants_in_the_step():
    src = SMALL.format(expr="x * exp(1000)")
    at(located(load, src), src, 4, "exp")
    src = SMALL.format(expr="x * (1 / (D - 4))")
    spec = load(src)
    at(located(spec.plan, D=4), src, 4, "1 /")
    spec.plan(D=5)
    src = HYPER.format(v="0.5").replace("h * a", "h * exp(a)")
    spec = load(src)
    err = located(spec.plan, D=2, a=1000)
    at(err, src, 4, "exp")
    assert "a = 1000" in err.message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_hyper_parameters_given_at_instantiation_must_be_finite(value):
    src = HYPER.format(v="0.5")
    at(located(load(src).plan, D=2, a=value), src, 1, "a=")


def test_the_cli_reports_a_bad_constant_with_its_location(tmp_path):
    f = tmp_path / "bad.rec"
    src = HYPER.format(v="exp(1000)")
    f.write_text(src)
    out = subprocess.run([sys.executable, "-m", "recdsl", "check", str(f)], capture_output=True, text=True,
                         cwd=REPO, timeout=120, env={**os.environ, "RECDSL_DEBUG": ""})
    assert out.returncode == 1, out.stderr
    assert f"bad.rec:1:{col(src, 1, 'exp')}: error:" in out.stderr and "overflows" in out.stderr


# --------------------------------------------------------------------------- part 7: names

PARAM = ("cell P(D):\n    input x[D]\n    param {n}[D] = 1\n    state h[D] = 0\n    h' = h * 0.5 + x * {n}\n"
         "    output h'\n")


@pytest.mark.parametrize("name", ["forward", "training", "type", "eval", "float", "compile", "double", "step",
                                  "half", "to", "cuda", "parameters", "state_dict", "_parameters", "plan",
                                  "selection", "ran", "compiled", "spec", "ir", "dims", "generated",
                                  "initial_state", "reset_parameters", "backend_name", "T_destination"])
def test_params_named_like_module_attributes_are_refused(name):
    src = PARAM.format(n=name)
    err = located(load, src)
    at(err, src, 3, name)
    assert "rename" in err.hint


@pytest.mark.parametrize("name, line, kind", [
    ("self", 2, "input"), ("reverse", 2, "input"), ("cu_seqlens", 2, "input"), ("edges", 2, "input"),
    ("self", 3, "param"), ("self", 4, "state"),
])
def test_inputs_params_states_named_like_call_arguments_are_refused(name, line, kind):
    lines = ["cell P(D):", "    input x[D]", "    param w[D] = 1", "    state h[D] = 0",
             "    h' = h * 0.5 + x * w", "    output h'", ""]
    old = {"input": "x", "param": "w", "state": "h"}[kind]
    lines[line - 1] = lines[line - 1].replace(f" {old}[", f" {name}[")
    src = "\n".join(lines)
    at(located(load, src), src, line, name)


@pytest.mark.parametrize("name", SPEC_OPTIONS + ("self",))
def test_dims_named_like_spec_options_are_refused(name):
    src = f"cell P({name}):\n    input x[{name}]\n    state h[{name}] = 0\n    h' = h + x\n    output h'\n"
    at(located(load, src), src, 1, name)
    src = f"cell P(D, {name}=0.5):\n    input x[D]\n    state h[D] = 0\n    h' = h * {name} + x\n    output h'\n"
    at(located(load, src), src, 1, name)


@pytest.mark.parametrize("name", ["lambda", "class", "None", "True"])
def test_python_keywords_as_param_names_are_refused(name):
    src = PARAM.format(n=name)
    err = located(load, src)
    assert err.span.line == 3


def test_ordinary_names_next_to_the_api_build_and_run():
    import torch
    # `trace` names spec.plan's first argument, which is positional: a dimension may use it
    src = ("cell P(trace, weight=0.5):\n    input x[trace], state_in[trace]\n    param bias[trace] = 1\n"
           "    state h[trace] = 0\n    h' = h * weight + x * bias + state_in\n    output forward = h'\n")
    spec = load(src)
    spec.plan(trace=3)
    layer = spec(backend="reference", trace=3, weight=0.25)
    y, st = layer(x=torch.randn(1, 2, 3), state_in=torch.randn(1, 2, 3))
    assert y.shape == (1, 2, 3) and set(st) == {"h"}


def test_module_api_covers_torch_and_the_layer():
    torch = pytest.importorskip("torch")
    from recdsl.runtime import RecModule
    layer = load(PARAM.format(n="w"))(backend="reference", D=2)
    plain = torch.nn.Module()
    torch_names = {n for n in set(dir(plain)) | set(vars(plain)) if not n.startswith("__")}
    missing = sorted(torch_names - TORCH_MODULE_API)
    assert not missing, f"add to recdsl.builtins.TORCH_MODULE_API: {missing}"
    names = set(dir(RecModule)) | set(vars(layer)) | set(dir(layer))
    names -= set(layer._parameters)  # its own param, w
    missing = sorted(n for n in names if not n.startswith("__") and n not in MODULE_API)
    assert not missing, f"add to recdsl.builtins.LAYER_API: {missing}"
    assert not LAYER_API & torch_names
    # and every one of them is refused as a param name
    for n in ("forward", "_apply", "plan"):
        with pytest.raises(RecError):
            load(PARAM.format(n=n))


def test_mutations_of_hostile_cells_give_rec_errors_only():
    """A few quick variations around the new checks (the full fuzz is test_mutation)."""
    srcs = [CHAIN.format(n=n) for n in ("0", "-3", "D*D", "D**64", "2**62", "1.5", "K")]
    srcs += [HYPER.format(v=v) for v in ("1e-999", "-1e999", "(-1)**2", "2**-1074", "(1e200)**2", "0**0", "-0.0")]
    for src in srcs:
        try:
            spec = recdsl.load(src)
            spec.plan(D=3)
        except RecError as e:
            assert e.span is not None, str(e)
