"""The generated code's own names (forward(inputs, initial, params, ...), the modules it calls:
scans, launch, seq_rt, ...) are plain words, so a user value named exactly like one of them
must not shadow it: a user name always reaches generated code wrapped (`in_inputs`,
`p_params`, `s_ran`, `seq7_reverse`; recdsl/torch_expr.py, "names in generated code").

One cell whose inputs, params, states, locals and output carry those names, run on every
sequence backend with a diagonal scan, a chunkwise matrix stage and a nonlinear loop among
its stages: the reference's numbers (outputs, final states, gradients), and `layer.ran`
the selection's kernels. (`reverse`, `cu_seqlens`, `dtype`, `device` cannot be inputs or
dims: they are keyword arguments of the layer's call and constructor; they are states and
params here.)"""
from __future__ import annotations

import re

import pytest
import torch

import recdsl
from helpers import as_tuple, outputs_and_grads, random_inputs

NAMES = '''
cell Names(seq_rt):
    input  inputs[seq_rt], initial[seq_rt], scans[seq_rt], launch[seq_rt]
    param  params[seq_rt, seq_rt] ~ normal(0, 0.3)
    param  dtype[seq_rt] ~ normal(0, 0.3)
    param  device[seq_rt] ~ normal(0, 0.3)
    param  prefix_rank[seq_rt] ~ normal(0, 0.3)
    state  ran[seq_rt] = 0
    state  reverse[seq_rt] = 0
    state  cu_seqlens[seq_rt, seq_rt] = 0
    first_input = logsigmoid(launch) / 4
    ran' = tanh(params @ inputs + dtype * ran)
    reverse' = sigmoid(device) * reverse + initial * scans
    cu_seqlens' = exp(first_input)[:, None] * cu_seqlens + outer(scans, initial)
    output step_params = inputs @ cu_seqlens' + ran' + reverse' * prefix_rank
'''
# the generated code's own names that the cell's user names spell (seq_prefix_rank and
# first_input the forward binds itself, once, at the top)
GENERATED = ("inputs", "initial", "params", "step_params", "prefix_rank", "dtype", "device", "first_input",
             "reverse", "cu_seqlens", "ran", "scans", "launch", "seq_rt")
B, T = 2, 6


@pytest.mark.parametrize("call", [{}, {"reverse": True}], ids=["forward", "reverse"])
@pytest.mark.parametrize("backend", ["torch", "newton", "triton"])
def test_user_values_named_like_generated_names(backend, call):
    spec = recdsl.load(NAMES)
    dims = {"seq_rt": 3}
    torch.manual_seed(0)
    ref = spec(backend="reference", **dims).double()
    layer = spec(backend=backend, **dims).double()
    layer.load_state_dict(ref.state_dict())
    # the names do reach the generated code, wrapped, beside the generated code's own
    code = layer.generated
    assert "in_inputs" in code or "inputs['inputs']" in code
    assert all(f"{name}[" in code or f"{name}." in code or f"{name}," in code for name in ("inputs", "initial"))
    rebound = [ln for ln in code.splitlines() for name in GENERATED
               if re.match(rf"\s*{name}\s*=", ln) and name not in ("first_input",)]
    assert not rebound, rebound   # no user value is bound to a generated name
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, B, T, torch.float64).items()}
    g = torch.Generator().manual_seed(3)
    state = {"ran": torch.randn(B, 3, generator=g, dtype=torch.float64) * 0.5,
             "reverse": torch.randn(B, 3, generator=g, dtype=torch.float64) * 0.5,
             "cu_seqlens": torch.randn(B, 3, 3, generator=g, dtype=torch.float64) * 0.5}
    state = {k: v.requires_grad_() for k, v in state.items()}
    o1, s1, g1 = outputs_and_grads(ref, xs, state, **call)
    o2, s2, g2 = outputs_and_grads(layer, xs, state, **call)
    assert layer.ran == [c.kernel.name for c in layer.selection.stages], (layer.ran, layer.selection.stages)
    assert len(layer.ran) == 3                          # a scan, a chunkwise matrix stage and a loop
    assert set(s2) == {"ran", "reverse", "cu_seqlens"}
    for a, b in zip(o1, o2):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=0, atol=1e-10)
    assert all((a is None) == (b is None) for a, b in zip(g1, g2))
    for a, b in zip(g1, g2):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
    with torch.no_grad():   # torch: the fused C loop's mode
        o3, s3 = layer(**{k: v.detach() for k, v in xs.items()}, state={k: v.detach() for k, v in state.items()},
                       **call)
    assert layer.ran == [c.kernel.name for c in layer.selection.stages]
    for a, b in zip(o1, as_tuple(o3)):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=1e-10)


def test_the_reference_step_names():
    """The reference's step reads its arguments by their own names, the user's wrapped."""
    spec = recdsl.load(NAMES)
    layer = spec(backend="reference", seq_rt=3)
    code = layer.generated
    assert "def step(inputs, states, params, prefix_rank, dtype, device):" in code
    for line in ("in_inputs = inputs['inputs']", "p_params = params['params']", "s_ran = states['ran']",
                 "p_prefix_rank = params['prefix_rank']", "s_reverse = states['reverse']"):
        assert line in code, line
