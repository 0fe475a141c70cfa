"""backends/triton/traffic.py: bytes moved by interpreted Triton kernels on CPU tensors.

The kernels are built with jit_from_source(interpret=True); TRITON_INTERPRET itself is
left unset, since Triton only reads it when @triton.jit runs."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from recdsl.backends.triton import aot
from recdsl.backends.triton.jit import jit_from_source
from recdsl.backends.triton.traffic import Traffic, analytic_minimum, count_traffic, counting
from triton_test_kernels import AFFINE_SCAN, ATOMIC_ACC, MASKED_COPY, RECURRENT_DOT, ROW_STATS


@pytest.fixture(scope="module")
def k():
    names = {"masked_copy": MASKED_COPY, "affine_scan": AFFINE_SCAN,
             "recurrent_dot": RECURRENT_DOT, "atomic_acc": ATOMIC_ACC}
    return {n: jit_from_source(src, n, f"{n}.py", interpret=True) for n, src in names.items()}


def _copy(k, x, y, n, block=128):
    k["masked_copy"][(triton_cdiv(n, block),)](x, y, n, BLOCK=block)


def triton_cdiv(a, b):
    return -(-a // b)


def test_masked_copy_counts_exactly_active_lanes(k):
    n = 1000  # not a multiple of BLOCK: the last program has 24 masked-off lanes
    x, y = torch.randn(n), torch.zeros(n)
    t = count_traffic(lambda: (_copy(k, x, y, n), _copy(k, x, y, n)))
    assert torch.equal(x, y)
    assert t.load_bytes == t.store_bytes == 2 * n * 4
    assert t.launches == 2
    assert t.per_kernel == {"masked_copy": (2 * n * 4, 2 * n * 4, 2)}
    assert 2 * analytic_minimum([x], [y]) == t.total_bytes


def test_masked_off_lanes_move_nothing(k):
    x, y = torch.randn(1024), torch.zeros(1024)
    t = count_traffic(lambda: _copy(k, x, y, 300))  # 8 programs, only 300 lanes active
    assert (t.load_bytes, t.store_bytes, t.launches) == (300 * 4, 300 * 4, 1)
    assert torch.equal(y[:300], x[:300]) and not y[300:].any()


def test_element_size_follows_pointer_type(k):
    x, y = torch.randn(100, dtype=torch.float64), torch.zeros(100, dtype=torch.float64)
    t = count_traffic(lambda: _copy(k, x, y, 100))
    assert t.load_bytes == t.store_bytes == 100 * 8


def test_scan_reads_and_writes_each_element_once(k):
    T, C = 12, 20  # tile 16 x 16: masked rows and a masked tail of channels
    a, x, h = torch.rand(T, C) * 0.9, torch.randn(T, C), torch.zeros(T, C)
    t = count_traffic(lambda: k["affine_scan"][(2,)](a, x, h, T, C, BLOCK_T=16, BLOCK_C=16))
    ref, prev = torch.zeros(T, C), torch.zeros(C)
    for i in range(T):
        prev = a[i] * prev + x[i]
        ref[i] = prev
    torch.testing.assert_close(h, ref)
    assert t.total_bytes == analytic_minimum([a, x], [h]) == 3 * T * C * 4
    assert t.per_kernel["affine_scan"] == (2 * T * C * 4, T * C * 4, 1)


def test_dot_loop_loads_weights_once(k):
    T, B, H = 5, 16, 16
    x, h = torch.randn(T, B, H) * 0.1, torch.zeros(T, B, H)
    w = (torch.randn(H, H) * 0.2).half()
    t = count_traffic(lambda: k["recurrent_dot"][(1,)](x, w, h, T, B=B, H=H))
    prev = torch.zeros(B, H)
    for i in range(T):
        prev = prev.half().float() @ w.float() + x[i]
        torch.testing.assert_close(h[i], prev, rtol=1e-3, atol=1e-4)
    assert t.load_bytes == H * H * 2 + T * B * H * 4
    assert t.store_bytes == T * B * H * 4
    assert t.total_bytes == analytic_minimum([x, w], [h])


def test_atomics_count_as_load_and_store(k):
    n = 200
    x, out = torch.ones(n), torch.zeros(n)
    t = count_traffic(lambda: k["atomic_acc"][(2,)](x, out, n, BLOCK=128))
    assert torch.equal(out, x)
    # the plain load of x, then a read and a write of out per active lane
    assert (t.load_bytes, t.store_bytes) == (2 * n * 4, n * 4)


def test_per_kernel_split_and_nesting(k):
    x, y = torch.randn(64), torch.zeros(64)
    a, h = torch.rand(4, 8), torch.zeros(4, 8)
    with counting() as outer:
        _copy(k, x, y, 64, block=64)
        inner = count_traffic(lambda: k["affine_scan"][(1,)](a, a, h, 4, 8, BLOCK_T=4, BLOCK_C=8))
    assert inner.per_kernel == {"affine_scan": (2 * 32 * 4, 32 * 4, 1)}
    assert outer.per_kernel == {"masked_copy": (64 * 4, 64 * 4, 1), "affine_scan": inner.per_kernel["affine_scan"]}
    assert outer.launches == 2


def test_hooks_removed_afterwards_even_on_error(k):
    before = (interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__)

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        count_traffic(boom)
    assert (interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__) == before
    # and launches outside count_traffic are not counted by a finished counter
    done = count_traffic(lambda: None)
    _copy(k, torch.ones(8), torch.zeros(8), 8)
    assert done == Traffic()


@pytest.mark.skipif(not isinstance(tl.standard.zeros, triton.runtime.JITFunction),
                    reason="TRITON_INTERPRET was set at import: stdlib helpers cannot compile")
def test_stdlib_helpers_interpret_then_compile_in_one_process(tmp_path, monkeypatch):
    # tl.sum / tl.zeros / ... are JITFunctions here (TRITON_INTERPRET was off at import);
    # the launch swaps in interpreted twins and restores triton.language afterwards, so a
    # real compile of the same kernel still works.
    core_before = dict(vars(tl.core))
    k = jit_from_source(ROW_STATS, "row_stats", interpret=True)
    x, out = torch.randn(16, 16), torch.zeros(16)
    t = count_traffic(lambda: k[(1,)](x, out, BLOCK=16))
    ref = x.sum(1) + x.max(1).values + torch.sigmoid(x.cumsum(1)).sum(1)
    torch.testing.assert_close(out, ref)
    assert t.total_bytes == analytic_minimum([x], [out])
    assert all(vars(tl.core)[name] is v for name, v in core_before.items())
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    fn = jit_from_source(ROW_STATS, "row_stats")
    assert aot.compile_kernel(fn, {"x_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 16}, arch=80).registers > 0


def test_analytic_minimum():
    assert analytic_minimum([torch.zeros(3, 4), torch.zeros(5, dtype=torch.float16)],
                            [torch.zeros(2, dtype=torch.int64)]) == 48 + 10 + 16
