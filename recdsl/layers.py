"""torch.nn conventions over any cell with one vector input and one vector output: layers,
directions, dropout between layers, time-major input, and weights from and to
torch.nn.LSTM / torch.nn.GRU (whose layout the stdlib's `lstm` and `gru` keep).

    stack = recdsl.layers.Stack("lstm", num_layers=2, bidirectional=True, D=16, H=32)
    y, states = stack(x)                   # x [B, T, 16] -> y [B, T, 64]
    stack = recdsl.layers.from_torch(torch.nn.LSTM(16, 32, num_layers=2))   # same outputs
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import RecError
from .spec import CellSpec, load

TORCH_CELLS = {nn.LSTM: "lstm", nn.GRU: "gru"}
TORCH_WEIGHTS = {"W_ih": "weight_ih", "W_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh"}


class Stack(nn.Module):
    """num_layers x (1 or 2 directions) modules of one cell. Layer l > 0 reads the
    directions of layer l - 1 side by side (its input dimension is set to that width);
    dropout (training only) between layers, as torch.nn.LSTM. Returns (output, states):
    states one dict per layer and direction, layer-major, forward direction first."""

    def __init__(self, cell: str | CellSpec, num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
                 batch_first: bool = True, backend: str = "auto", dtype=None, device=None, **dims):
        super().__init__()
        spec = cell if isinstance(cell, CellSpec) else load(cell)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise RecError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise RecError(f"dropout must be in [0, 1), got {dropout!r}")
        self.input_name, self.input_dim = _vector_port(spec, "inputs")
        self.output_name = _vector_port(spec, "outputs")[0]
        self.num_layers, self.bidirectional = num_layers, bool(bidirectional)
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        directions = 2 if self.bidirectional else 1
        cells, width = [], None
        for layer in range(num_layers):
            layer_dims = dict(dims) if width is None else {**dims, self.input_dim: width * directions}
            for d in range(directions):
                cells.append(spec(backend=backend, reverse=d == 1, dtype=dtype, device=device, **layer_dims))
            width = cells[-1].ir.shape_of(cells[-1].ir.outputs[self.output_name])[0]
        self.cells = nn.ModuleList(cells)
        self.hidden_size = width

    def forward(self, x: torch.Tensor, state: list | None = None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        if state is not None and len(state) != len(self.cells):
            raise RecError(f"state has {len(state)} entries; this stack has {len(self.cells)} "
                           f"(num_layers x directions)")
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                k = layer * directions + d
                out, st = self.cells[k](state=None if state is None else state[k], **{self.input_name: x})
                outs.append(out[0] if isinstance(out, tuple) else out)
                finals.append(st)
            x = torch.cat(outs, -1) if directions == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        return (x if self.batch_first else x.transpose(0, 1)), finals

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, bidirectional={self.bidirectional}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")

    def to_torch(self) -> nn.Module:
        """The same weights in torch.nn.LSTM / torch.nn.GRU (stdlib `lstm` / `gru` only)."""
        name = self.cells[0].spec.name.lower()
        cls = next((c for c, n in TORCH_CELLS.items() if n == name), None)
        if cls is None:
            raise RecError(f"to_torch converts the stdlib lstm and gru; this stack runs {self.cells[0].spec.name}")
        first = self.cells[0]
        m = cls(first.dims["D"], first.dims["H"], num_layers=self.num_layers, bidirectional=self.bidirectional,
                dropout=self.dropout, batch_first=self.batch_first, dtype=first.W_ih.dtype, device=first.W_ih.device)
        with torch.no_grad():
            for cell, suffix in zip(self.cells, _suffixes(self.num_layers, self.bidirectional)):
                for ours, theirs in TORCH_WEIGHTS.items():
                    getattr(m, theirs + suffix).copy_(getattr(cell, ours))
        return m


def from_torch(m: nn.Module, backend: str = "auto") -> Stack:
    """A Stack of the stdlib `lstm` / `gru` with the weights of a torch.nn.LSTM / GRU."""
    name = TORCH_CELLS.get(type(m))
    if name is None:
        raise RecError(f"from_torch converts torch.nn.LSTM and torch.nn.GRU, not {type(m).__name__}")
    if not m.bias or getattr(m, "proj_size", 0):
        raise RecError(f"{type(m).__name__} with bias=False or proj_size has no stdlib counterpart",
                       hint="write the cell you need as a .rec file")
    p = m.weight_ih_l0
    stack = Stack(name, num_layers=m.num_layers, bidirectional=m.bidirectional, dropout=m.dropout,
                  batch_first=m.batch_first, backend=backend, dtype=p.dtype, device=p.device,
                  D=m.input_size, H=m.hidden_size)
    with torch.no_grad():
        for cell, suffix in zip(stack.cells, _suffixes(m.num_layers, m.bidirectional)):
            for ours, theirs in TORCH_WEIGHTS.items():
                getattr(cell, ours).copy_(getattr(m, theirs + suffix))
    return stack


def _suffixes(num_layers: int, bidirectional: bool) -> list[str]:
    """torch.nn's parameter suffixes, in the Stack's module order."""
    return [f"_l{layer}{'_reverse' if d else ''}" for layer in range(num_layers) for d in range(1 + bidirectional)]


def _vector_port(spec: CellSpec, kind: str) -> tuple[str, str | None]:
    """(name, dimension name) of the cell's one vector input (output)."""
    ports = getattr(spec.cell, kind)
    ports = dict(ports) if kind == "inputs" else {o.name: o.type for o in ports}
    if len(ports) != 1:
        raise RecError(f"a Stack needs a cell with one {kind[:-1]}; {spec.name} has {len(ports)}: "
                       + ", ".join(ports), hint="stack the modules yourself (spec(...) per layer)")
    name, var = next(iter(ports.items()))
    shape = var.shape
    dim = str(shape[0]) if shape is not None and len(shape) == 1 else None
    if kind == "inputs" and (dim is None or dim not in spec.cell.dims):
        raise RecError(f"a Stack feeds layer l's output to layer l+1's input: {spec.name}'s input {name} must be "
                       "a vector whose length is one dimension (x[D])")
    return name, dim
