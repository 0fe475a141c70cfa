"""The selection: typed forms per stage and backend, decided once, from the analysis's
value ranges; fallbacks explicit; the analysis and the matchers import no backend."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import recdsl
import recdsl.lowering as L
from helpers import as_tuple, random_inputs
from recdsl.spec import stdlib_files

RETENTION = """cell Retention(K, V{hyper}):
    input q[K], k[K], v[V], g[], z[]
{param}    state S[K, V] = 0
    S' = {decay} * S + outer(k, v)
    output o = (q * K**-0.5) @ S'
"""
# spelling -> (hyper, param line, decay, expected: log space or signed)
SPELLINGS = {
    "constant": ("", "", "0.9", "log"),
    "hyper": (", gamma=0.9", "", "gamma", "log"),
    "exp": ("", "", "exp(g)", "log"),
    "sigmoid": ("", "", "sigmoid(z)", "log"),
    "one minus sigmoid": ("", "", "(1 - sigmoid(z))", "log"),
    "exp of minus softplus": ("", "", "exp(-softplus(z))", "log"),
    "sigmoid root": ("", "", "sigmoid(z) ** (1 / 4)", "log"),
    "raw param": ("", "    param gamma[] = 0.9\n", "gamma", "signed"),
    "signed": ("", "", "0.9 * tanh(z)", "signed"),
}


def _retention(name):
    hyper, param, decay, _ = SPELLINGS[name]
    return recdsl.load(RETENTION.format(hyper=hyper, param=param, decay=decay))


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_decay_spelling_runs_chunkwise(name):
    plan = _retention(name).plan(K=4, V=5)
    form = plan.selected("torch", 0)
    assert isinstance(form, L.ChunkDiag), (name, form)
    assert form.signed == (SPELLINGS[name][3] == "signed"), name
    assert (form.log_decay is not None) == (SPELLINGS[name][3] == "log"), name
    choice = plan.selections["triton"].choice(0)
    # Triton's chunkwise kernels (chunk_kernels.py), a signed decay as log|d| and its running sign
    assert choice.form == form and choice.kernel.name == "triton.chunk_diag" and choice.kernel.borrowed is None


@pytest.mark.parametrize("name", ["raw param", "signed", "constant"])
@pytest.mark.parametrize("gamma", [0.9, -0.7, 0.0])
def test_signed_and_constant_decays_match_the_reference(name, gamma):
    spec = _retention(name)
    ref = spec(backend="reference", K=3, V=4).double()
    run = spec(backend="torch", K=3, V=4).double()
    if name == "raw param":
        with torch.no_grad():
            ref.gamma.fill_(gamma)
    run.load_state_dict(ref.state_dict())
    xs = {k: x.requires_grad_() for k, x in random_inputs(spec, ref, 2, 70, torch.float64, scale=2.0).items()}
    (o1, s1), (o2, s2) = ref(**xs), run(**xs)
    assert torch.allclose(o1, o2, atol=1e-10) and torch.allclose(s1["S"], s2["S"], atol=1e-10)
    g1 = torch.autograd.grad(o1.sum(), list(xs.values()) + list(ref.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(o2.sum(), list(xs.values()) + list(run.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None and gamma != 0.0:   # at a zero decay log|d| is clamped: its own gradient is not exact
            assert torch.allclose(a, b, atol=1e-8)


def test_a_growing_decay_is_warned_about_with_its_line():
    spec = recdsl.load("cell G(K):\n    input z[K], x[K]\n    state h[K] = 0\n"
                       "    h' = (1 + sigmoid(z)) * h + x\n    output h'\n")
    (warning,) = spec.plan().warnings
    assert "h may grow without bound" in warning and "(line 4)" in warning


@pytest.mark.parametrize("name", sorted(n for n in stdlib_files() if recdsl.load(n).cell.over == "seq"))
def test_no_stdlib_cell_is_warned_about(name):
    assert recdsl.load(name).plan().warnings == []


def test_a_kernel_without_reverse_or_varlen_makes_the_runtime_flip_and_split():
    """A large HMM forward's stage runs a kernel that leaves reverse and cu_seqlens to the
    runtime (triton.dense_semiring, Caps "runtime"): they must not be handed to its driver
    (they once were, to a borrowed torch kernel, and were ignored)."""
    plan = recdsl.load("hmm_forward").plan(N=128)
    sel = plan.selections["triton"]
    kernel = sel.choice(0).kernel
    assert kernel.name == "triton.dense_semiring" and kernel.borrowed is None, kernel.name
    assert (kernel.caps.reverse, kernel.caps.varlen) == ("runtime", "runtime") and not sel.native
    assert plan.selections["triton"].native is False
    assert recdsl.load("lstm").plan().selections["triton"].native


def test_kda_and_rwkv7_run_the_dplr_form():
    for name in ("kda", "rwkv7"):
        choice = recdsl.load(name).plan().selections["torch"].choice(0)
        assert isinstance(choice.form, L.ChunkDPLR)
        assert [type(p) for p in choice.passed] == [L.Passed, L.Passed]


def test_the_analysis_and_the_matchers_import_no_backend():
    code = ("import sys, recdsl\nfrom recdsl.analysis import analyze\nfrom recdsl.lowering import lower\n"
            "s = recdsl.load('kda'); lower(analyze(s.lower(**s.analysis_dims()), verify=False))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'backends' or m.startswith('recdsl.backends')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_registry_entry_names_an_emitter_method():
    from recdsl.backends.torch.codegen import Emitter
    from recdsl.backends.triton.codegen import TritonEmitter
    from recdsl.pipeline import backend_module
    for name, emitter in (("torch", Emitter), ("triton", TritonEmitter)):
        for kernel in backend_module(name).REGISTRY.kernels:
            assert callable(getattr(emitter, kernel.emit, None)), kernel.name
            assert issubclass(kernel.form, L.Form)


def test_outputs_do_not_depend_on_the_spelling():
    """0.9, gamma=0.9, exp(g) with g = log 0.9 and a raw param 0.9: the same numbers."""
    outs = []
    for name in ("constant", "hyper", "exp", "raw param"):
        spec = _retention(name)
        layer = spec(backend="torch", K=3, V=4).double()
        if name == "raw param":   # initialised in float32: 0.9 exactly once in float64
            with torch.no_grad():
                layer.gamma.fill_(0.9)
        xs = random_inputs(spec, layer, 2, 40, torch.float64)
        xs["g"] = torch.full_like(xs["g"], torch.log(torch.tensor(0.9, dtype=torch.float64)).item())
        outs.append(as_tuple(layer(**xs)[0])[0])
    assert all(torch.allclose(o, outs[0], atol=1e-12) for o in outs)


def test_the_compiled_stages_are_a_dict_to_dump_and_layer_plan_is_the_plan_that_ran():
    layer = recdsl.load("gla")(K=4, V=5, backend="torch")
    stages = layer.compiled.stages()
    assert list(stages) == ["ast", "ir", "passes", "plan", "select", "emit", "build"]
    assert stages["plan"] is layer.plan and stages["select"]["torch"] is layer.selection
    assert stages["build"] is layer._program and "torch.chunk_diag" in stages["emit"]
