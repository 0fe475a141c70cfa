"""recdsl.recompute_chunk_states: a chunkwise Triton stage keeps no chunk states for its
backward, which runs the state pass again -- the same gradients (the same kernels on the
same values), one more launch of the state kernel, less saved memory. Every chunkwise
family: diagonal decay, the delta rule (and its Householder products), DPLR."""
import pytest
import torch

import recdsl
from helpers import launch_counter, outputs_and_grads, random_initial_state, random_inputs
from recdsl.backends.triton import chunk_dplr_kernels, chunk_kernels, delta_kernels

# cell -> (its chunk stage's registry kernel, the module it launches from, its state-pass kernel)
FAMILIES = {
    "gla": ("triton.chunk_diag", chunk_kernels, "chunk_diag_fwd_states"),
    "gated_deltanet": ("triton.chunk_delta", delta_kernels, "delta_fwd_states"),
    "deltaproduct": ("triton.delta_product", delta_kernels, "delta_fwd_states"),
    "kda": ("triton.chunk_dplr", chunk_dplr_kernels, "chunk_dplr_fwd_states"),
}


def _run(name, recompute: bool, monkeypatch, **call):
    """(outputs, final states, gradients, the state pass's launches, bytes saved for the
    backward) of a fresh float64 layer at T = 37 (two chunks, the last short)."""
    spec = recdsl.load(name)
    layer = spec(backend="triton", **spec.analysis_dims(K=16, V=16)).double()
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B = 1 if "cu_seqlens" in call else 2
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, layer, B, 37, torch.float64).items()}
    rows = len(call["cu_seqlens"]) - 1 if "cu_seqlens" in call else B
    state = random_initial_state(spec, layer, rows)
    stage, module, kernel = FAMILIES[name]
    counts = launch_counter(module, monkeypatch)
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t
    with recdsl.recompute_chunk_states(recompute), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out, fin, grads = outputs_and_grads(layer, xs, state, **call)
    assert stage in layer.ran, layer.ran
    return out, fin, grads, counts.get(kernel, 0), sum(saved)


@pytest.mark.parametrize("call", [{}, {"reverse": True}, {"cu_seqlens": torch.tensor([0, 5, 5, 37])}],
                         ids=["plain", "reverse", "cu_seqlens"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_recomputed_states_give_the_same_gradients(name, call, monkeypatch):
    out1, fin1, grads1, launches1, bytes1 = _run(name, False, monkeypatch, **call)
    out2, fin2, grads2, launches2, bytes2 = _run(name, True, monkeypatch, **call)
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert all(torch.equal(fin1[k], fin2[k]) for k in fin1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert (launches1, launches2) == (1, 2)        # the backward's own state pass
    assert bytes2 < bytes1, (bytes1, bytes2)


def test_the_choice_is_the_forwards_and_is_scoped():
    """The context restores what was before (nested, or after an error); a backward run
    outside it still recomputes what its forward did not keep."""
    from recdsl.memory import recomputing_chunk_states
    assert not recomputing_chunk_states()
    with recdsl.recompute_chunk_states():
        assert recomputing_chunk_states()
        with recdsl.recompute_chunk_states(False):
            assert not recomputing_chunk_states()
        assert recomputing_chunk_states()
    with pytest.raises(ZeroDivisionError), recdsl.recompute_chunk_states():
        1 / 0
    assert not recomputing_chunk_states()
