"""The `triton` backend: generated Triton kernels for the GPU, run here (no GPU) in Triton's
interpreter on CPU tensors and compiled ahead of time for sm_80 / sm_90 (`aot.py`).

`emit(ir, plan)` gives the kernel module's text (`recdsl inspect --stage triton`) and the
torch driver that launches it; `build(ir)` execs both. See codegen.py for what runs each
stage, scan_kernels.py / seq_kernels.py for the kernels, launch.py for the autograd
wrappers."""
from __future__ import annotations

import linecache
import zlib

from recdsl.ir import IRCell

from .kernels import REGISTRY  # noqa: F401  (the forms this backend runs, and how)

NAME = "triton"


def supports(ir: IRCell) -> str | None:
    if ir.over not in ("seq", "grid2d", "dag"):
        return f"the triton backend runs sequences, grids and DAGs, not `over {ir.over}`"
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton is a dependency
        return "triton is not installed"
    return None


def emit(plan, selection):
    """(kernel module text, driver source, emitter)."""
    if _wavefront(selection):   # a grid on the generated wavefront kernel (grid_kernels.py)
        gp = _grid_program(plan, selection)
        return gp.kernels_source, gp.source, gp
    if plan.ir.over != "seq":   # grids and DAGs: the borrowed torch graph kernels (backends/torch/graph.py)
        from ..torch.graph import GraphProgram
        gp = GraphProgram(plan, selection)
        return "", gp.source, gp
    from .codegen import TritonEmitter
    em = TritonEmitter(plan.ir, plan, selection)
    driver = em.program()
    return em.kernel_module(), driver, em


def exec_source(text: str, tag: str, ns: dict) -> dict:
    """exec generated (torch driver) text under a file name linecache knows, so that
    tracebacks show the generated line."""
    fname = f"<recdsl {tag} {zlib.crc32(text.encode()):08x}>"
    linecache.cache[fname] = (len(text), None, text.splitlines(True), fname)
    exec(compile(text, fname, "exec"), ns)
    return ns


class Program:
    def __init__(self, plan, selection):
        import torch
        import torch.nn.functional as F

        from ..torch import fused_loop, scans, seq_rt

        from . import launch
        self.kernels_source, self.source, em = emit(plan, selection)
        self.emitter = em
        self.native = selection.native     # reverse and cu_seqlens handled by the kernels
        self.module = launch.Kernels(self.kernels_source, f"recdsl-triton-{plan.ir.name}")
        self.stages = [launch.Stage(k, self.module) for k in em.kernels]
        self.ran: list[str] = []
        ns = {"torch": torch, "F": F, "seq_rt": seq_rt, "scans": scans, "fused_loops": em.fused,
              "fused_loop": fused_loop, "launch": launch, "stage_kernels": self.stages, "ran": self.ran}
        exec_source(self.source, f"triton-driver {plan.ir.name}", ns)
        self.fn = ns["forward"]

    def run(self, xs, st, params, heads, dtype, device, reverse: bool = False, cu_seqlens=None):
        prefix_rank = 2 if heads else 1
        step_params = {n: p[None] for n, p in params.items()}         # [1, (heads,) ...]: a step's layout
        seq_params = {n: p[None, None] for n, p in params.items()}    # [1, 1, (heads,) ...]: the sequence's
        self.ran.clear()
        return self.fn(xs, st, params, step_params, seq_params, prefix_rank, dtype, device,
                       reverse, cu_seqlens)   # cu_seqlens: int32, on device


def _wavefront(selection) -> bool:
    return any(c.kernel.name == "triton.wavefront" for c in selection.stages)


def _grid_program(plan, selection):
    from .grid_kernels import GridProgram
    return GridProgram(plan, selection)


def build(ir: IRCell, plan, selection) -> Program:
    if _wavefront(selection):
        return _grid_program(plan, selection)
    if ir.over != "seq":
        from ..torch.graph import GraphProgram
        return GraphProgram(plan, selection)
    return Program(plan, selection)


SCALARS = {"T", "C", "C1", "C2", "B", "NH", "TL", "X", "Y"}   # X, Y: a grid kernel's sides


def _arg_type(name: str) -> str:
    if name == "cu":
        return "*i32"
    return "i32" if name in SCALARS or "_s" in name else "*fp32"


def compile_cell(emitted, arch: int = 90):
    """Every kernel of an emitted cell (recdsl.pipeline.emit_cell(ir, "triton")) compiled
    ahead of time for sm_<arch> (no GPU needed): (kernel module text, [aot.Compiled])."""
    import triton.language as tl

    from . import aot, launch
    from .jit import module_from_source
    text, em = emitted.kernels, emitted.emitter
    ns = module_from_source(text, f"recdsl-triton-aot-{emitted.plan.ir.name}", interpret=False)
    out = []
    for k in em.kernels:
        for backward, suffix in ((False, "_fwd"), (True, "_bwd")):
            names = k.arg_names(backward)
            sig = {n: _arg_type(n) for n in names}
            const = k.constexprs(backward, tl.float32)   # (VARLEN, REVERSE off: the common case)
            out.append(aot.compile_kernel(ns[k.name + suffix], sig, const, arch=arch,
                                          num_warps=getattr(k, "gpu_warps", 4),   # as launch runs it
                                          extra_options={"maxnreg": launch.MAXNREG}))
    out += _chunk_kernels(emitted, arch)
    return text, out


# The fixed kernel sets (one module each, the same text for every cell) and the registry
# entries that run them: `recdsl inspect --stage triton` prints them, compile_cell compiles them.
FIXED_KERNELS = {"triton.chunk_diag": "chunk_kernels", "triton.chunk_delta": "delta_kernels",
                 "triton.delta_product": "delta_kernels", "triton.chunk_dplr": "chunk_dplr_kernels",
                 "triton.dplr_recurrent": "dplr_kernels",
                 "triton.dense_semiring": "semiring_kernels"}


def fixed_kernel_modules(selection) -> list:
    """The fixed kernel modules the selection's stages run, in stage order, each once."""
    import importlib
    names = dict.fromkeys(FIXED_KERNELS[c.kernel.name] for c in selection.stages if c.kernel.name in FIXED_KERNELS)
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def _chunk_kernels(emitted, arch: int) -> list:
    """The fixed kernel sets of the stages that run them, compiled at each such stage's state
    shape (K x V for the matrix states, N for a semiring's vector)."""
    import importlib
    ir, out, seen = emitted.plan.ir, [], set()
    for c in emitted.selection.stages:
        if c.kernel.name in FIXED_KERNELS:
            module = importlib.import_module(f"{__name__}.{FIXED_KERNELS[c.kernel.name]}")
            shape = tuple(ir.shape_of(ir.states[c.form.states[0]]))[-2:]
            if (module.__name__, shape) not in seen:
                seen.add((module.__name__, shape))
                out += module.compile_ahead(arch, *shape)
    return out
