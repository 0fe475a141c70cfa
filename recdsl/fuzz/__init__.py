"""Differential fuzzing of the backends (`recdsl fuzz`).

generator: random well-typed cells as .rec text (every class of LANGUAGE.md §4), and
           mutants of sources for the frontend;
runner:    one case (cell, dims, B, T, dtype, grad/no_grad, ...) on every backend against
           `reference`; the fuzz loop and its report;
shrink:    a disagreement reduced to a minimal cell and shapes;
inject:    deliberately injected backend bugs (test-only, off unless asked)."""
from .generator import generate, mutate
from .runner import Case, Report, fuzz, run_case
from .shrink import shrink

__all__ = ["generate", "mutate", "Case", "Report", "fuzz", "run_case", "shrink"]
