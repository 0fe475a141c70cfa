"""Ahead-of-time compilation of Triton kernels for NVIDIA GPUs, on a machine without one.

`triton.compile` runs the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) with
the ptxas Triton ships, so it needs no driver: only a GPUTarget naming the architecture.
What it cannot give without a GPU is register usage (`metadata.n_regs` is filled in when
the cubin is loaded onto a device). We get registers and spills by running the same
bundled ptxas again with `-v` on the PTX (see `_ptxas_usage`); tests cross-check the
register count against `cuobjdump --dump-resource-usage` on Triton's own cubin.

Results are cached on disk, because a compile plus a ptxas run takes ~0.5-2 s per kernel
(one JSON file per kernel, through the kernel cache's atomic writes: torch/kcache.py).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

# Triton 3.9 warns on every compile unless the fp-fusion default is given explicitly;
# 1 is its default behaviour, so setting it changes nothing but the noise.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ..torch import kcache  # noqa: E402
from .jit import jit_from_source  # noqa: E402,F401  (re-exported: aot.jit_from_source)
from recdsl.errors import RecError  # noqa: E402

_ASM_TEXT = ("ttir", "ttgir", "llir", "ptx")


@dataclasses.dataclass
class Compiled:
    name: str
    arch: int
    asm: dict  # ttir/ttgir/llir/ptx: str, cubin: bytes
    shared: int  # bytes of shared memory the kernel needs (Triton's metadata)
    registers: int  # per thread, from ptxas -v
    spill_stores: int  # bytes, from ptxas -v
    spill_loads: int  # bytes, from ptxas -v
    stack: int  # stack frame bytes (local memory), from ptxas -v
    num_warps: int

    @property
    def spills(self) -> int:
        """Spill traffic in bytes (stores + loads); 0 means nothing spilled."""
        return self.spill_stores + self.spill_loads


def cache_dir() -> Path:
    # RECDSL_CACHE is what backends/torch/cpu_kernels.py honours; accept both names.
    root = (os.environ.get("RECDSL_CACHE_DIR") or os.environ.get("RECDSL_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "recdsl"))
    return Path(root) / "triton-aot"


def _full_signature(fn, signature: dict, constexprs: dict) -> dict:
    # Triton wants every parameter in the signature; constexpr ones are typed "constexpr".
    # Accept signatures that leave those out, which is the natural way to write them.
    sig = dict(signature)
    for k in constexprs:
        sig.setdefault(k, "constexpr")
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"{fn.__name__}: no type for parameter(s) {missing}")
    return {a: sig[a] for a in fn.arg_names}  # parameter order, as Triton expects


def _cache_key(fn, signature, constexprs, arch, options) -> str:
    # fn.cache_key hashes the source of fn and of every @jit function it calls, so a
    # change in a combine function invalidates the entry too.
    payload = json.dumps(
        [fn.src, fn.cache_key, signature, {k: repr(v) for k, v in constexprs.items()}, arch,
         options, triton.__version__], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                   num_stages: int = 3, extra_options: dict | None = None) -> Compiled:
    """Compile the (non-interpreted) JITFunction `fn` for sm_<arch>.

    signature: parameter -> Triton type ("*fp32", "i32", ...); constexpr parameters may be
    left out. constexprs: parameter -> value. extra_options go to triton.compile as-is
    (e.g. {"maxnreg": 128})."""
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"expected a non-interpreted triton JITFunction, got {type(fn).__name__}"
                        " (was it decorated with TRITON_INTERPRET on? use jit_from_source)")
    options = {"num_warps": num_warps, "num_stages": num_stages, **(extra_options or {})}
    signature = _full_signature(fn, signature, constexprs)
    key = _cache_key(fn, signature, constexprs, arch, options)
    for path in kcache.find_file(cache_dir(), f"{key}.json"):
        try:
            return _load(path, key)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a corrupt, foreign or old-format entry: recompile and overwrite it

    try:
        kernel = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32), options=options)
    except triton.CompilationError as e:
        if not isinstance(triton.language.standard.zeros, triton.runtime.JITFunction):
            # see jit.py: the stdlib helpers were built for the interpreter at import
            raise RecError("TRITON_INTERPRET=1 was set when triton was imported, so triton's own "
                           "helpers (tl.zeros, tl.sum, ...) became interpreter functions and nothing "
                           "can be compiled for a GPU in this process",
                           hint="unset TRITON_INTERPRET for ahead-of-time compiles (recdsl runs its "
                           "kernels interpreted on CPU tensors without it)") from None
        raise
    usage = _ptxas_usage(kernel.asm["ptx"], arch, kernel.metadata)
    out = Compiled(name=kernel.metadata.name, arch=arch,
                   asm={k: kernel.asm[k] for k in (*_ASM_TEXT, "cubin")},
                   shared=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
                   **usage)
    _store(key, out)
    return out


def _ptxas_usage(ptx: str, arch: int, metadata) -> dict:
    """Registers, spills and stack frame of the kernel in `ptx`, from `ptxas -v`.

    Chosen over `cuobjdump --dump-resource-usage` because only ptxas reports spill
    stores/loads separately (cuobjdump only gives LOCAL, which also counts local arrays).
    We must run the same ptxas Triton ran: Triton 3.9 uses `ptxas` (CUDA 12.9) below
    sm_90 but `ptxas-blackwell` (CUDA 13.x) from sm_90 on, and the PTX it emits for the
    latter has a .version the older ptxas rejects. Flags mirror Triton's make_cubin."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE).group(1)  # e.g. sm_90a
    flags = ["-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}"]
    if not getattr(metadata, "enable_fp_fusion", True):
        flags.append("--fmad=false")
    if getattr(metadata, "ptx_options", None):
        flags += metadata.ptx_options.split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        res = subprocess.run([get_ptxas(arch).path, *flags, str(src), "-o", str(src.with_suffix(".o"))],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr  # ptxas writes its -v report to stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({res.returncode}):\n{log}")
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    """Pull the numbers out of a `ptxas -v` report for a single-kernel module. Lines look like
        ptxas info    : Used 10 registers, used 0 barriers, 392 bytes cmem[0]
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    (the prefix is 'ptxas-blackwell info' for the newer binary, hence no anchoring)."""
    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise ValueError(f"no match for {pattern!r} in ptxas output:\n{log}")
        return int(m.group(1))

    return {"registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"),
            "stack": grab(r"(\d+) bytes stack frame")}


def _store(key: str, c: Compiled) -> None:
    data = dataclasses.asdict(c)
    data["asm"] = {k: v for k, v in c.asm.items() if k != "cubin"}
    data["cubin_b64"] = base64.b64encode(c.asm["cubin"]).decode()
    data["key"] = key
    # kcache: written whole then renamed (a reader never sees half a file); a cache that is
    # not a writable directory warns once and this process keeps its entries in a temp dir
    kcache.store_file(cache_dir(), f"{key}.json", json.dumps(data).encode())


def _load(path: Path, key: str) -> Compiled:
    data = json.loads(path.read_text())
    if data.pop("key", None) != key:   # another entry copied or renamed to this name
        raise ValueError(f"{path.name} is not the entry it is named after")
    data["asm"]["cubin"] = base64.b64decode(data.pop("cubin_b64"))
    return Compiled(**data)


def summary_table(compiled: list[Compiled]) -> str:
    """Plain-text table: one row per kernel; spills as 'store/load' bytes."""
    rows = [("kernel", "arch", "regs", "spills(st/ld B)", "shared B", "warps")]
    rows += [(c.name, f"sm_{c.arch}", str(c.registers), f"{c.spill_stores}/{c.spill_loads}",
              str(c.shared), str(c.num_warps)) for c in compiled]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
