"""Sequential kernels (time loop inside the kernel): see below."""
from __future__ import annotations


class NotEligible(Exception):
    pass


class SeqKernel:
    def __init__(self, ir, sp, place, notes):
        raise NotEligible("sequential Triton kernels are not built yet")
