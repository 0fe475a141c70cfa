"""The `reference` backend: a plain per-step torch loop over the IR.

Slow and obviously right: it runs every sequence cell and is the oracle of every test.
`emit_step(ir)` writes the step as Python text (what `recdsl inspect --stage reference`
shows), one line per IR node, each annotated with the .rec line it came from; the
runtime compiles that text once and loops it over time."""
from __future__ import annotations

from recdsl.errors import RecError
from recdsl.ir import IRCell, Node, Op
from recdsl.lowering import Caps, Kernel, Registry, SequentialLoop, Vectorised

from recdsl.torch_expr import SourceNotes, TorchExpr, temp_name, user_name

NAME = "reference"


def supports(ir: IRCell) -> str | None:
    """None if this backend runs the cell, else why not (one sentence naming the construct).
    The reference runs every cell: sequences here, grids and DAGs in graph.py."""
    return None


def emit_step(ir: IRCell) -> str:
    if ir.over != "seq":
        raise RecError(f"a cell `over {ir.over}` has no per-step code: the reference evaluates it cell by cell "
                       "(backends/reference/graph.py)", ir.checked.span)
    names: dict[int, str] = {}

    def name_of(n: Node) -> str:
        return names[n.id]

    expr = TorchExpr(name_of)
    notes = SourceNotes(ir)
    lines = [
        notes.header(ir, "reference"),
        "# One step of the recurrence; the runtime loops it over time.",
        "# inputs: this step's; states: the previous step's; params. Every tensor has prefix_rank",
        "# leading prefix axes ([B] or [B, heads]; params: size 1 on B).",
        "def step(inputs, states, params, prefix_rank, dtype, device):",
    ]
    update_of = {n.id: s for s, n in ir.updates.items()}
    output_of = {n.id: o for o, n in ir.outputs.items()}
    nodes = ir.nodes()
    num = {n.id: i for i, n in enumerate(nodes)}  # stable names: position in the order
    for n in nodes:
        if n.op == Op.CONST and not n.shape:
            names[n.id] = expr.operand(n, 0)
            continue
        # names from the one scheme of recdsl/torch_expr.py: no user name can collide
        if n.op == Op.INPUT:
            var, rhs = user_name("in", n.arg), f"inputs[{n.arg!r}]"
        elif n.op == Op.PARAM:
            var, rhs = user_name("p", n.arg), f"params[{n.arg!r}]"
        elif n.op == Op.STATE:
            var, rhs = user_name("s", n.arg[0]), f"states[{n.arg[0]!r}]"
        else:
            if n.id in update_of:
                var = user_name("next", update_of[n.id])
            else:
                var = temp_name("t", num[n.id], n.name)
            rhs = expr(n)
        names[n.id] = var
        code = f"    {var} = {rhs}"
        note = notes(n, with_text=n.op not in (Op.INPUT, Op.PARAM, Op.STATE))
        if n.id in output_of:
            note += f"  -> output {output_of[n.id]}"
        lines.append(f"{code:<60}  # {note}" if note else code)
    new_states = ", ".join(f"{s!r}: {names[n.id]}" for s, n in ir.updates.items())
    # a constant output (`output 7`) is a number in the code above: returned as a tensor
    outs = ", ".join(f"{o!r}: torch_rt.with_prefix({expr.operand(n, 0, as_tensor=True)}, prefix_rank)"
                     if n.op == Op.CONST and not n.shape else f"{o!r}: {names[n.id]}" for o, n in ir.outputs.items())
    lines.append(f"    return {{{new_states}}}, {{{outs}}}")
    return "\n".join(lines) + "\n"


def build_step(ir: IRCell):
    """Compile the emitted text (built only from the validated IR) into a function."""
    import torch
    import torch.nn.functional as F

    from recdsl import torch_rt
    src = emit_step(ir)
    namespace = {"torch": torch, "F": F, "torch_rt": torch_rt}
    exec(compile(src, f"<recdsl reference {ir.name}>", "exec"), namespace)
    return namespace["step"], src


class Program:
    """The per-step loop: the generated step applied for t = 0 .. T-1."""

    def __init__(self, ir: IRCell):
        self.ir = ir
        if ir.over == "seq":
            self.step, self.source = build_step(ir)
        else:
            from recdsl.ir import dump
            self.step, self.source = None, "# evaluated cell by cell over the " + ir.over + "\n" + dump(ir)

    def run(self, xs, st, params, heads, dtype, device):
        import torch
        step_params = {n: p[None] for n, p in params.items()}   # one leading (batch) axis, as the step's tensors
        prefix_rank = 2 if heads else 1
        T = next(iter(xs.values())).shape[1]
        per_t: dict[str, list] = {o: [] for o in self.ir.outputs}
        for t in range(T):
            st, outs = self.step({n: x[:, t] for n, x in xs.items()}, st, step_params, prefix_rank, dtype, device)
            for o, v in outs.items():
                per_t[o].append(v)
        stacked = {}
        for o, vals in per_t.items():
            shape = torch.broadcast_shapes(*(v.shape for v in vals))
            stacked[o] = torch.stack([v.expand(shape) for v in vals], dim=1)
        return stacked, st


def build(ir: IRCell, plan=None, selection=None) -> Program:
    """The reference runs the cell as written: the plan and selection only describe it."""
    return Program(ir)


# The reference runs the step as written whatever the stage: one kernel for every form it is offered.
_LOOP = "the step as written, one step at a time (grids and DAGs: cell by cell in dependency order)"
REGISTRY = Registry("reference", tuple(Kernel(form, "reference.loop", _LOOP, "", Caps())
                                       for form in (Vectorised, SequentialLoop)), oracle=True)
