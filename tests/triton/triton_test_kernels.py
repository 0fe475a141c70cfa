"""Small hand-written Triton kernels, as source text, shared by test_aot.py and
test_traffic.py: built with jit_from_source (interpreted or not) so one text serves both."""

MASKED_COPY = '''
@triton.jit
def masked_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)
'''

# h[t, c] = a[t, c] * h[t-1, c] + x[t, c] with h[-1] = 0, as a scan over time of the
# affine maps h -> a*h + x; one program per block of channels, all of time in one tile.
AFFINE_SCAN = '''
@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # apply (a1, b1) first, then (a2, b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def affine_scan(a_ptr, x_ptr, h_ptr, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.arange(0, BLOCK_T)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs = rows[:, None] * C + cols[None, :]
    m = (rows[:, None] < T) & (cols[None, :] < C)
    a = tl.load(a_ptr + offs, mask=m, other=1.0)
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    _, h = tl.associative_scan((a, x), 0, _affine_combine)
    tl.store(h_ptr + offs, h, mask=m)
'''

# h_t = h_{t-1} @ W + x_t over t < T: x, h are [T, B, H] fp32, W is [H, H] fp16 and is
# loaded once; the matmul runs on 16x16 fp16 tiles with an fp32 accumulator.
RECURRENT_DOT = '''
@triton.jit
def recurrent_dot(x_ptr, w_ptr, h_ptr, T, B: tl.constexpr, H: tl.constexpr):
    rb = tl.arange(0, B)
    rh = tl.arange(0, H)
    w = tl.load(w_ptr + rh[:, None] * H + rh[None, :])
    tile = rb[:, None] * H + rh[None, :]
    h = tl.zeros((B, H), dtype=tl.float32)
    for t in range(T):
        x = tl.load(x_ptr + t * B * H + tile)
        h = tl.dot(h.to(tl.float16), w) + x
        tl.store(h_ptr + t * B * H + tile, h)
'''

# out[i] += x[i] atomically: each active lane reads and writes out.
ATOMIC_ACC = '''
@triton.jit
def atomic_acc(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.atomic_add(out_ptr + offs, tl.load(x_ptr + offs, mask=m), mask=m)
'''

# Uses triton.language's own @jit helpers (tl.zeros, tl.sum, tensor.max, tl.cumsum,
# tl.sigmoid), which need jit.interpreted_language() to run in the interpreter when
# TRITON_INTERPRET was off at `import triton`.
ROW_STATS = '''
@triton.jit
def row_stats(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
    y = tl.sum(x, 1) + x.max(1) + tl.sigmoid(tl.cumsum(x, 1)).sum(1) + tl.zeros((BLOCK,), tl.float32)
    tl.store(out_ptr + offs, y)
'''
