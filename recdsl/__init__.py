"""recdsl: a compiler for recurrent cells written in the .rec language.

    spec = recdsl.load("gla")          # a stdlib name, a path to a .rec file, or source text
    print(spec.summary())
"""
from .errors import RecError, Source, Span
from .memory import recompute_chunk_states
from .spec import CellSpec, load, load_all, parse_and_check

__all__ = ["RecError", "Source", "Span", "CellSpec", "load", "load_all", "parse_and_check",
           "recompute_chunk_states"]
__version__ = "0.1.0"
