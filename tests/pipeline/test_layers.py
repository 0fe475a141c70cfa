"""recdsl.layers: torch.nn.LSTM / GRU conventions (layers, directions, time-major input,
dropout between layers) over recdsl cells; from_torch / to_torch keep the weights, so a
converted model gives torch.nn's outputs, final states and gradients (float64), on every
built backend that runs here."""
from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl import RecError
from recdsl.layers import Stack, from_torch

SHAPES = [dict(num_layers=1, bidirectional=False, batch_first=True),
          dict(num_layers=2, bidirectional=True, batch_first=False),
          dict(num_layers=3, bidirectional=False, batch_first=False)]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("cls", [torch.nn.LSTM, torch.nn.GRU])
def test_from_torch_matches_torch_nn(cls, shape, backend):
    torch.manual_seed(0)
    theirs = cls(5, 7, dtype=torch.float64, **shape)
    ours = from_torch(theirs, backend=backend)
    x = torch.randn((4, 6, 5) if shape["batch_first"] else (6, 4, 5), dtype=torch.float64, requires_grad=True)
    y1, st1 = theirs(x)
    y2, st2 = ours(x)
    assert torch.allclose(y1, y2, atol=1e-12)
    h_n = st1[0] if cls is torch.nn.LSTM else st1
    assert torch.allclose(h_n, torch.stack([s["h"] for s in st2]), atol=1e-12)
    if cls is torch.nn.LSTM:
        assert torch.allclose(st1[1], torch.stack([s["c"] for s in st2]), atol=1e-12)
    g1, = torch.autograd.grad(y1.pow(2).sum(), x)
    g2, = torch.autograd.grad(y2.pow(2).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-10)
    back = ours.to_torch()
    assert torch.allclose(back(x)[0], y1, atol=1e-12)


def test_dropout_between_layers_only_in_training():
    stack = Stack("gru", num_layers=2, dropout=0.5, D=3, H=4, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    stack.eval()
    a, b = stack(x)[0], stack(x)[0]
    assert torch.equal(a, b)
    stack.train()
    torch.manual_seed(1)
    assert not torch.equal(stack(x)[0], a)
    assert stack.cells[1].dims["D"] == 4 and stack.hidden_size == 4


def test_stack_of_any_one_input_cell_and_clear_refusals():
    stack = Stack("mgu", num_layers=2, bidirectional=True, D=3, H=4)
    y, states = stack(torch.randn(2, 5, 3))
    assert y.shape == (2, 5, 8) and len(states) == 4 and stack.cells[2].dims["D"] == 8
    with pytest.raises(RecError, match="one input"):
        Stack("gla", K=4, V=4)
    with pytest.raises(RecError, match="from_torch converts"):
        from_torch(torch.nn.RNN(3, 4))
    with pytest.raises(RecError, match="bias=False"):
        from_torch(torch.nn.LSTM(3, 4, bias=False))
