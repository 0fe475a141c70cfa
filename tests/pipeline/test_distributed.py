"""DDP over recdsl modules: two CPU processes (gloo), the model passed to the workers by
pickling (mp.spawn: the generated code is re-created in each worker), a few SGD steps on
different data per rank; the ranks' parameters stay identical and equal to one process
training on both ranks' data."""
from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import recdsl

STEPS, B, T, D, H = 3, 2, 6, 4, 8


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = recdsl.load("lstm")(D=D, H=H, backend="torch")
        self.gla = recdsl.load("gla")(K=H, V=H, backend="torch")

    def forward(self, x):
        h = self.lstm(x=x)[0]
        return self.gla(q=h, k=h, v=h, gk=torch.nn.functional.logsigmoid(h))[0]


def _data(rank: int, step: int) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(100 * step + rank))


def _worker(rank: int, model: Model, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = copy.deepcopy(model)   # mp.spawn hands both workers the parameters in shared memory
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        ddp(_data(rank, step)).pow(2).mean().backward()
        opt.step()
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    # both ranks done before either tears gloo down: a rank exiting while its peer still
    # talks to it aborts the peer ("terminate called without an active exception", seen once)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_match_one_process(tmp_path):
    torch.manual_seed(0)
    model = Model()
    single = Model()
    single.load_state_dict(model.state_dict())
    mp.spawn(_worker, args=(model, _free_port(), str(tmp_path / "params")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"params.{r}") for r in range(2)]
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for step in range(STEPS):   # DDP averages the ranks' gradients: the mean of the two losses
        opt.zero_grad()
        sum(single(_data(r, step)).pow(2).mean() for r in range(2)).div(2).backward()
        opt.step()
    for name, want in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], want, atol=1e-6), name
