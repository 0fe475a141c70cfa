"""What the chunkwise kernels keep for the backward: the state before every chunk, or
nothing (the backward recomputes it).

The triton backend's chunkwise stages (diagonal decay, the delta rule, DPLR) store, by
default, the state before every chunk: [B * H, ceil(T / BT), K, V] in fp32 per stage (the
delta rule and DPLR also their chunk's new values, [B, T, H, V]). At K = V = 128 that is
more than the stage's bf16 inputs. Inside `recompute_chunk_states()` a forward keeps none
of it and its backward runs the state pass again first (one kernel, a sequential walk
over each sequence's chunks): less memory for one more launch, as fla does for its h.
The choice is made at the forward and holds for its backward. Other stages are
unaffected (wrap a layer in torch.utils.checkpoint to recompute everything)."""
from __future__ import annotations

import contextlib
import threading

_local = threading.local()


@contextlib.contextmanager
def recompute_chunk_states(enabled: bool = True):
    """Within this block (this thread), chunkwise Triton stages recompute their chunk
    states in the backward instead of keeping them from the forward."""
    before = recomputing_chunk_states()
    _local.recompute = bool(enabled)
    try:
        yield
    finally:
        _local.recompute = before


def recomputing_chunk_states() -> bool:
    """Whether a forward run now keeps no chunk states (see recompute_chunk_states)."""
    return getattr(_local, "recompute", False)
