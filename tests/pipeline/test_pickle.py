"""Modules save whole and cross process boundaries: pickle / torch.save drop the generated
code and re-create it from the cell on load (the code lives in no importable module);
deepcopy shares it. A model with a nonlinear (compiled loop) and a chunkwise cell, on
every built backend that runs here."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import recdsl


class TwoCells(torch.nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.lstm = recdsl.load("lstm")(D=4, H=8, backend=backend)
        self.gla = recdsl.load("gla")(K=8, V=8, heads=2, backend=backend)

    def forward(self, x):
        h = self.lstm(x=x)[0]
        h = h[0] if isinstance(h, tuple) else h
        q = k = v = h.view(*h.shape[:2], 1, 8).expand(-1, -1, 2, -1)
        o = self.gla(q=q, k=k, v=v, gk=torch.nn.functional.logsigmoid(q))[0]
        return o[0] if isinstance(o, tuple) else o


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_torch_save_and_pickle_round_trip(backend):
    torch.manual_seed(0)
    model = TwoCells(backend)
    x = torch.randn(2, 5, 4)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for got in (loaded(x), pickle.loads(pickle.dumps(model))(x)):
        assert torch.equal(got, want)
    assert loaded.lstm.ran == model.lstm.ran and loaded.lstm.generated == model.lstm.generated
    assert loaded.lstm.plan.stages[0].cls == model.lstm.plan.stages[0].cls


def test_deepcopy_shares_the_generated_code_and_copies_the_parameters():
    layer = recdsl.load("lstm")(D=4, H=8, backend="torch")
    twin = copy.deepcopy(layer)
    assert twin.compiled is layer.compiled and twin._program is layer._program
    assert twin.W_hh is not layer.W_hh and torch.equal(twin.W_hh, layer.W_hh)
    with torch.no_grad():
        twin.W_hh.add_(1.0)
    x = torch.randn(2, 3, 4)
    assert not torch.equal(twin(x=x)[0], layer(x=x)[0])
