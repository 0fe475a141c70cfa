"""backends/triton/traffic.py's compute counts and roofline on hand-computable kernels: a
copy's bytes, one tl.dot's FLOPs, a loop's chain of dots, the torch operators outside the
kernels, and the roofline arithmetic of those counts."""
import pytest
import torch

from recdsl.backends.triton import traffic
from recdsl.backends.triton.jit import jit_from_source
from recdsl.backends.triton.traffic import H100, H200, count_traffic, roofline
from triton_test_kernels import MASKED_COPY, RECURRENT_DOT

# out = a @ b for one [M, K] x [K, N] tile per program; programs stacked along axis 0.
ONE_DOT = '''
@triton.jit
def one_dot(a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    pid = tl.program_id(0)
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + pid * M * K + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(out_ptr + pid * M * N + rm[:, None] * N + rn[None, :], tl.dot(a, b))
'''


@pytest.fixture(scope="module")
def k():
    names = {"masked_copy": MASKED_COPY, "recurrent_dot": RECURRENT_DOT, "one_dot": ONE_DOT}
    return {n: jit_from_source(src, n, f"{n}.py", interpret=True) for n, src in names.items()}


def test_copy_moves_its_bytes_and_no_flops(k):
    n = 1000
    x, y = torch.randn(n), torch.zeros(n)
    t = count_traffic(lambda: k["masked_copy"][(8,)](x, y, n, BLOCK=128))
    (run,) = t.launch_log
    assert (run.kernel, run.programs, run.load_bytes, run.store_bytes) == ("masked_copy", 8, n * 4, n * 4)
    assert (t.dot_flops, t.dots, t.chain) == (0, 0, 0)
    est = roofline(t, H100)  # memory-bound: 8000 bytes at 3.35 TB/s, plus one launch
    assert est.seconds == pytest.approx(8000 / 3.35e12 + 3e-6)
    assert est.compute_s == est.serial_s == 0


def test_one_dot_counts_two_m_n_k_per_program(k):
    M, N, K, programs = 16, 32, 64, 3
    a, b, out = torch.randn(programs * M, K), torch.randn(K, N), torch.zeros(programs * M, N)
    t = count_traffic(lambda: k["one_dot"][(programs,)](a, b, out, M=M, N=N, K=K))
    torch.testing.assert_close(out, a @ b, rtol=1e-4, atol=1e-4)
    assert t.dot_flops == programs * 2 * M * N * K
    assert t.dots == programs and t.chain == 1
    (run,) = t.launch_log
    assert run.program_flops == 2 * M * N * K
    assert t.kernel_compute("one_dot") == (programs * 2 * M * N * K, programs, 1)
    # b is read once per program: 3 programs x (a tile + b) + the outputs
    assert t.load_bytes == (programs * M * K + programs * K * N) * 4


def test_a_loop_of_dots_is_a_chain_of_its_length(k):
    T, B, H = 7, 16, 16
    x, h = torch.randn(T, B, H) * 0.1, torch.zeros(T, B, H)
    w = (torch.randn(H, H) * 0.2).half()
    t = count_traffic(lambda: k["recurrent_dot"][(1,)](x, w, h, T, B=B, H=H))
    assert t.chain == T and t.dots == T
    assert t.dot_flops == T * 2 * B * H * H
    (run,) = t.launch_log
    assert run.program_flops == T * 2 * B * H * H
    # one program does all the dots: the serial term is its FLOPs at one SM's share
    m, c, s = traffic.launch_seconds(run, H200)
    assert s == pytest.approx(T * 2 * B * H * H / (494.5e12 / 132))
    assert c == pytest.approx(s / 132)
    assert roofline(t, H200).seconds == pytest.approx(max(m, c, s) + 3e-6)


def test_chain_is_the_busiest_program_and_launches_sum(k):
    """Two launches: the chain is the longest of any program; the estimate sums launches."""
    T, B, H = 5, 16, 16
    x, h, w = torch.randn(T, B, H) * 0.1, torch.zeros(T, B, H), (torch.randn(H, H) * 0.2).half()
    a, b, out = torch.randn(16, 16), torch.randn(16, 16), torch.zeros(16, 16)

    def run():
        k["one_dot"][(1,)](a, b, out, M=16, N=16, K=16)
        k["recurrent_dot"][(1,)](x, w, h, T, B=B, H=H)
    t = count_traffic(run)
    assert [r.chain for r in t.launch_log] == [1, T] and t.chain == T
    est = roofline(t, H100)
    parts = [max(traffic.launch_seconds(r, H100)) for r in t.launch_log]
    assert est.seconds == pytest.approx(sum(parts) + 2 * 3e-6)
    assert est.launch_s == pytest.approx(2 * 3e-6)


def test_torch_ops_outside_kernels_are_counted_once_each(k):
    """A copy kernel between two torch operators: the operators count their operands'
    bytes and one launch each; the interpreter's staging copies inside the launch do not."""
    n = 256
    x = torch.randn(n)

    def run():
        y = torch.zeros(n)            # a fill: writes n floats
        z = x * 2.0                   # reads x, writes z
        k["masked_copy"][(2,)](z, y, n, BLOCK=128)
        return y
    t = count_traffic(run, torch_ops=True)
    ops = [r for r in t.launch_log if r.torch_op]
    kernels = [r for r in t.launch_log if not r.torch_op]
    assert [r.kernel for r in kernels] == ["masked_copy"]
    assert [r.kernel for r in ops] == ["aten.zeros", "aten.mul"]
    assert [(r.load_bytes, r.store_bytes) for r in ops] == [(0, n * 4), (n * 4, n * 4)]
    assert t.per_kernel[traffic.TORCH_OPS][2] == 2
    assert t.per_kernel["masked_copy"] == (n * 4, n * 4, 1)
    without = count_traffic(run)
    assert traffic.TORCH_OPS not in without.per_kernel and len(without.launch_log) == 1
