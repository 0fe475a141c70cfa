"""Context parallelism (recdsl.parallel.ContextParallel): a sequence split along time over
two gloo CPU ranks gives the outputs, final state, and the gradients of the parameters and of
every input (the first rank's through the state sent on) of one process running the whole
sequence — a linear cell (GLA, chunkwise) and a nonlinear one (LSTM)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import recdsl
from recdsl.parallel import ContextParallel

B, T, SPLIT = 2, 11, 5


def _layer(name: str):
    torch.manual_seed(0)
    if name == "gla":
        return recdsl.load("gla")(K=4, V=3, heads=2, backend="torch").double()
    return recdsl.load("lstm")(D=3, H=4, backend="torch").double()


def _inputs(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "gla":
        q, k, v = (torch.randn(B, T, 2, n, generator=g, dtype=torch.float64) for n in (4, 4, 3))
        return {"q": q, "k": k, "v": v, "gk": -torch.rand(B, T, 2, 4, generator=g, dtype=torch.float64)}
    return {"x": torch.randn(B, T, 3, generator=g, dtype=torch.float64)}


def _loss(out) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple) else out
    return (out ** 2).sum()


def _worker(rank: int, name: str, port: int, path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    layer = _layer(name)
    chunk = slice(0, SPLIT) if rank == 0 else slice(SPLIT, T)
    xs = {k: v[:, chunk].clone().requires_grad_() for k, v in _inputs(name).items()}
    out, final = ContextParallel(layer)(**xs)
    _loss(out).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    torch.save({"out": out[0] if isinstance(out, tuple) else out, "final": final, "grads": grads,
                "input_grads": {k: x.grad for k, x in xs.items()}}, f"{path}.{rank}")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["gla", "lstm"])
def test_two_ranks_equal_one(name, tmp_path):
    mp.spawn(_worker, args=(name, _free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    layer = _layer(name)
    xs = {k: v.requires_grad_() for k, v in _inputs(name).items()}
    out, final = layer(**xs)
    _loss(out).backward()
    out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(torch.cat([r["out"] for r in ranks], 1), out, atol=1e-12)
    for s, v in final.items():
        assert torch.allclose(ranks[1]["final"][s], v, atol=1e-12), s
    for n, p in layer.named_parameters():
        for r in ranks:
            assert torch.allclose(r["grads"][n], p.grad, atol=1e-10), n
    for k, x in xs.items():   # the first rank's inputs get their gradient through the sent state
        assert torch.allclose(torch.cat([r["input_grads"][k] for r in ranks], 1), x.grad, atol=1e-10), k
