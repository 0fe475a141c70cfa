"""backends/triton/aot.py: compiling small Triton kernels for sm_80/sm_90 on a machine
with no GPU, reading registers/spills from ptxas, and the on-disk cache."""
import linecache
import os
import re
import subprocess

import pytest
import triton

from recdsl.backends.triton import aot
from recdsl.backends.triton.jit import jit_from_source
from triton_test_kernels import AFFINE_SCAN, MASKED_COPY, RECURRENT_DOT

# With TRITON_INTERPRET=1 at `import triton`, tl.zeros & co. are built for the interpreter
# and no kernel using them compiles (aot.compile_kernel says so); see backends/triton/jit.py.
STDLIB_COMPILES = isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)
pytestmark = pytest.mark.skipif(not STDLIB_COMPILES, reason="TRITON_INTERPRET was set at import")

COPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
SCAN_SIG = {"a_ptr": "*fp32", "x_ptr": "*fp32", "h_ptr": "*fp32", "T": "i32", "C": "i32"}
DOT_SIG = {"x_ptr": "*fp32", "w_ptr": "*fp16", "h_ptr": "*fp32", "T": "i32"}

CASES = {  # name -> (source, signature, constexprs)
    "masked_copy": (MASKED_COPY, COPY_SIG, {"BLOCK": 1024}),
    "affine_scan": (AFFINE_SCAN, SCAN_SIG, {"BLOCK_T": 32, "BLOCK_C": 16}),
    "recurrent_dot": (RECURRENT_DOT, DOT_SIG, {"B": 16, "H": 16}),
}


@pytest.fixture(autouse=True, scope="module")
def fresh_caches(tmp_path_factory):
    # Both our cache and Triton's own point at empty folders, so the tests really compile
    # and leave nothing in the home directory.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.mktemp("recdsl-cache")))
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        yield


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for name, (src, sig, ce) in CASES.items():
        fn = jit_from_source(src, name, f"{name}.py")
        for arch in (80, 90):
            out[name, arch] = aot.compile_kernel(fn, sig, ce, arch=arch)
    return out


def _cuobjdump_usage(cubin: bytes, tmp_path) -> dict:
    """REG/LOCAL/SHARED as cuobjdump reads them from the cubin Triton itself produced."""
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", list(CASES))
def test_compiles_for_arch(compiled, name, arch, tmp_path):
    c = compiled[name, arch]
    assert (c.name, c.arch, c.num_warps) == (name, arch, 4)
    for stage in ("ttir", "ttgir", "llir", "ptx"):
        assert isinstance(c.asm[stage], str) and c.asm[stage].strip()
    assert isinstance(c.asm["cubin"], bytes) and c.asm["cubin"][:4] == b"\x7fELF"
    target = "sm_90a" if arch == 90 else "sm_80"
    assert re.search(rf"^\s*\.target\s+{target}\b", c.asm["ptx"], re.M)
    assert c.registers > 0
    assert (c.spill_stores, c.spill_loads, c.spills) == (0, 0, 0)
    assert c.shared >= 0
    # our ptxas -v re-run must describe the cubin Triton built, not some other compile
    usage = _cuobjdump_usage(c.asm["cubin"], tmp_path)
    assert usage["REG"] == c.registers and usage["STACK"] == c.stack == 0


def test_dot_uses_tensor_cores(compiled):
    for arch in (80, 90):
        assert "mma" in compiled["recurrent_dot", arch].asm["ptx"]


def test_spills_are_read_from_ptxas(tmp_path):
    # 2048 fp32 values per thread capped at 24 registers cannot fit: ptxas must spill.
    fn = jit_from_source(MASKED_COPY, "masked_copy")
    c = aot.compile_kernel(fn, COPY_SIG, {"BLOCK": 2048}, arch=80, num_warps=1,
                           extra_options={"maxnreg": 24})
    assert c.registers <= 24 and c.spill_stores > 0 and c.spill_loads > 0 and c.stack > 0
    usage = _cuobjdump_usage(c.asm["cubin"], tmp_path)
    assert usage["REG"] == c.registers and usage["STACK"] == c.stack


def test_parse_ptxas_log_both_prefixes():
    log = ("ptxas-blackwell info    : Function properties for k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
           "ptxas-blackwell info    : Used 255 registers, used 1 barriers\n")
    assert aot.parse_ptxas_log(log) == {"registers": 255, "spill_stores": 12, "spill_loads": 16, "stack": 8}
    assert aot.parse_ptxas_log(log.replace("ptxas-blackwell", "ptxas"))["registers"] == 255
    with pytest.raises(ValueError):
        aot.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def test_cache_hit_skips_compiler(compiled, monkeypatch):
    src, sig, ce = CASES["affine_scan"]
    fn = jit_from_source(src, "affine_scan", "again.py")  # a new object, same text

    def no_compile(*a, **k):
        raise AssertionError("cache miss: triton.compile called")

    monkeypatch.setattr(aot.triton, "compile", no_compile)
    assert aot.compile_kernel(fn, sig, ce, arch=90) == compiled["affine_scan", 90]
    with pytest.raises(AssertionError, match="cache miss"):  # another constexpr is another key
        aot.compile_kernel(fn, sig, {**ce, "BLOCK_C": 32}, arch=90)
    with pytest.raises(AssertionError, match="cache miss"):  # so are other options
        aot.compile_kernel(fn, sig, ce, arch=90, num_warps=8)


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    assert aot.cache_dir() == tmp_path / "triton-aot"
    monkeypatch.delenv("RECDSL_CACHE_DIR")
    monkeypatch.delenv("RECDSL_CACHE", raising=False)
    assert aot.cache_dir() == aot.Path(os.path.expanduser("~")) / ".cache" / "recdsl" / "triton-aot"


def test_summary_table(compiled):
    table = aot.summary_table([compiled["masked_copy", 80], compiled["recurrent_dot", 90]])
    lines = table.splitlines()
    assert lines[0].split() == ["kernel", "arch", "regs", "spills(st/ld", "B)", "shared", "B", "warps"]
    assert lines[2].split()[:2] == ["masked_copy", "sm_80"]
    row = lines[3].split()
    c = compiled["recurrent_dot", 90]
    assert row == ["recurrent_dot", "sm_90", str(c.registers), "0/0", str(c.shared), "4"]


def test_rejects_interpreted_function():
    fn = jit_from_source(MASKED_COPY, "masked_copy", interpret=True)
    with pytest.raises(TypeError, match="non-interpreted"):
        aot.compile_kernel(fn, COPY_SIG, {"BLOCK": 128})


def test_jit_from_source_restores_interpret_knob(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert isinstance(jit_from_source(MASKED_COPY, "masked_copy", interpret=False), triton.runtime.JITFunction)
    assert not isinstance(jit_from_source(MASKED_COPY, "masked_copy", interpret=True), triton.runtime.JITFunction)
    assert not triton.knobs.runtime.interpret and "TRITON_INTERPRET" not in os.environ
    with pytest.raises(NameError):  # an error inside the exec restores it as well
        jit_from_source("@triton.jit\ndef k(x):\n    pass\nundefined_name\n", "k", interpret=True)
    assert not triton.knobs.runtime.interpret and "TRITON_INTERPRET" not in os.environ
    # and an interpret=True caller keeps its setting
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(jit_from_source(MASKED_COPY, "masked_copy", interpret=False), triton.runtime.JITFunction)
    assert triton.knobs.runtime.interpret and os.environ["TRITON_INTERPRET"] == "1"


def test_jit_from_source_same_filename_different_text():
    # Each text gets its own linecache entry, so the first kernel's source is still there.
    a = jit_from_source(MASKED_COPY, "masked_copy", "same.py")
    b = jit_from_source(AFFINE_SCAN, "affine_scan", "same.py")
    assert a.file_name != b.file_name
    assert "def masked_copy" in "".join(linecache.getlines(a.file_name))
    with pytest.raises(KeyError, match="nope"):
        jit_from_source(MASKED_COPY, "nope")
