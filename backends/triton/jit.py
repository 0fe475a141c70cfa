"""Turn Triton source text into a kernel object, compiled or interpreted on request.

Triton 3.9 details that make this more than an `exec`:

* `triton.jit` decides at *decoration* time whether it builds a `JITFunction` (real
  compile) or an `InterpretedFunction` (runs on CPU tensors), from
  `triton.knobs.runtime.interpret` / TRITON_INTERPRET. So the knob is forced for the
  duration of the exec and restored afterwards; launching later does not consult it.
* triton.language's own helpers written in Triton (tl.zeros, tl.sum, tl.max, tl.cumsum,
  tl.sigmoid, tl.cdiv, tl.flip, ...) are `@jit` functions too, decorated once when
  `triton` is imported. Unless TRITON_INTERPRET=1 was set *before that import* they are
  JITFunctions, which raise "Cannot call @triton.jit'd outside of the scope of a kernel"
  inside an interpreted kernel; if it was set, they are InterpretedFunctions and real
  compiles of kernels using them fail. `interpreted_language()` swaps interpreted twins
  in for the duration of a launch, so one process can both compile and interpret.
* Calling an interpreted helper leaves triton.language.core's builtins patched to the
  interpreter's versions (InterpretedFunction.__call__ never restores its patches), after
  which `triton.compile` fails with "'value' object has no attribute 'dtype'".
  `interpreted_language()` puts them back as well.
* Both kinds read the function's source through `inspect.getsourcelines` -- the
  JITFunction when it is decorated, the interpreter's AST rewriter again on the first
  launch (if that fails it silently runs the un-rewritten function). Text that only
  exists in memory must therefore sit in `linecache.cache`, under a filename no
  other text uses, for as long as the kernel lives: the entries are never removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import linecache
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from recdsl.ast_lock import AST_LOCK


def register_source(src: str, filename: str) -> str:
    """Put `src` in linecache under a unique name derived from `filename` and return it.

    The name embeds a hash of the text so two different sources given the same
    filename never overwrite each other, and the angle brackets keep `inspect` from
    reading a real file of the same name from disk instead."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    name = f"<{filename}:{digest}>"
    # mtime None marks the entry as not backed by a file, so linecache.checkcache keeps it.
    linecache.cache[name] = (len(src), None, src.splitlines(keepends=True), name)
    return name


def jit_from_source(src: str, name: str, filename: str = "recdsl-triton", interpret: bool = False):
    """Exec Triton source text in a fresh namespace and return the `@triton.jit` object `name`.

    `src` sees `triton` and `tl` (triton.language). With interpret=False the result is a
    JITFunction that `triton.compile` accepts (see aot.py); with interpret=True it is an
    InterpretedFunction that launches on CPU tensors (see traffic.py)."""
    namespace = module_from_source(src, filename, interpret)
    try:
        return namespace[name]
    except KeyError:
        raise KeyError(f"{name!r} is not defined by the Triton source {filename!r}") from None


class _IsolatedInterpretedFunction(InterpretedFunction):
    """An InterpretedFunction whose launches run inside interpreted_language()."""

    def run(self, *args, **kwargs):
        with interpreted_language():
            return super().run(*args, **kwargs)


_twins: dict[int, InterpretedFunction] = {}  # id(JITFunction) -> its interpreted twin


def _twin(jf: JITFunction) -> InterpretedFunction:
    # One twin per helper, always the same object: the interpreter recognises tl.sum /
    # tl.cumsum fast paths by comparing the combine function with tl.standard's by identity.
    if id(jf) not in _twins:
        _twins[id(jf)] = InterpretedFunction(jf.fn)
    return _twins[id(jf)]


def _method(twin):
    # tensor methods (x.sum()) need a plain function so that `self` gets bound
    def method(*args, **kwargs):
        return twin(*args, **kwargs)
    return method


# triton.language's attributes and the interpret knob are process-wide: threads take turns
# to swap them (an interpreted launch runs on CPU tensors, one at a time anyway) -- without
# the lock, a thread's launch met another's restored JITFunctions ("Did you forget to add
# @triton.jit ?") or its grid ("x >= grid_dim[0]"). It is the parser's AST lock: Triton's JIT
# and its interpreter's rewriter call ast.parse, which CPython 3.11 cannot run in two threads
# at once (see recdsl/ast_lock.py).
_LANGUAGE_LOCK = AST_LOCK


@contextlib.contextmanager
def interpreted_language():
    """Run interpreted launches against interpreted triton.language helpers; afterwards
    restore every attribute of triton.language the interpreter or we changed."""
    with _LANGUAGE_LOCK:
        yield from _swapped_language()


def _swapped_language():
    # Gluon copies the stdlib helpers when first imported and asserts they are
    # JITFunctions; the interpreter imports it lazily mid-launch, so import it first.
    with contextlib.suppress(ImportError):
        import triton.experimental.gluon.language  # noqa: F401
    owners = [tl, tl.core, tl.standard, tl.math, tl.random, tl.tensor]
    saved = [(o, dict(vars(o))) for o in owners]
    try:
        for o in owners:
            for name, v in list(vars(o).items()):
                if isinstance(v, JITFunction):
                    setattr(o, name, _method(_twin(v)) if o is tl.tensor else _twin(v))
        yield
    finally:
        for o, before in saved:
            for name, v in before.items():
                if vars(o).get(name) is not v:
                    setattr(o, name, v)
        # Names the interpreter *added* to these modules (its rewriter injects its own
        # globals into each helper's module) stay: cached rewritten helpers need them.


def module_from_source(src: str, filename: str = "recdsl-triton", interpret: bool = False) -> dict:
    """Exec Triton source text (kernels and their @jit helpers) in a fresh namespace and
    return it; `src` sees `triton` and `tl`."""
    fname = register_source(src, filename)
    namespace = {"triton": triton, "tl": tl, "__name__": "recdsl_triton"}
    # scope() snapshots the runtime knobs and the TRITON_* environment variables and
    # restores both on exit, error or not (setting the knob also writes TRITON_INTERPRET).
    with _LANGUAGE_LOCK, triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        exec(compile(src, fname, "exec"), namespace)
    if interpret:
        for obj in namespace.values():
            if type(obj) is InterpretedFunction:
                obj.__class__ = _IsolatedInterpretedFunction  # adds no state, only wraps run()
    return namespace


def jit_functions(source: str, names: tuple, module: str) -> str:
    """The @triton.jit functions `names` of a kernel module's source text, as text, for another
    fixed kernel module to include (one copy of each helper in the repository, not one per
    module); `module` names the includer in the error when a helper is missing."""
    parts = {part.split("(", 1)[0].removeprefix("def ").strip(): "@triton.jit\n" + part
             for part in source.split("@triton.jit\n")[1:]}
    missing = [name for name in names if name not in parts]
    if missing:
        raise ImportError(f"{module} includes the jit helpers {missing}, which the source it reads lacks")
    return "\n".join(parts[name].rstrip() + "\n\n" for name in names)
