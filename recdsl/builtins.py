"""The builtin functions of the .rec language: one table, read by the checker (shape
rules), the docs (`recdsl builtins`) and later by the IR lowering.

`rule` names the shape rule in recdsl/checker.py:
    unary     same shape as the argument
    bcast     numpy broadcasting of all arguments
    where     bcast, first argument a mask
    reduce    drops `axis` (default -1, the last; axis=None reduces everything)
    lastaxis  same shape, works along the last axis (rank >= 1)
    special   a rule of its own (checker method `_call_<name>`)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Builtin:
    name: str
    nargs: tuple[int, int]          # (min, max) positional arguments; max -1 = any
    rule: str
    kwargs: tuple[str, ...] = ()
    doc: str = ""


def _table(*rows: Builtin) -> dict[str, Builtin]:
    return {b.name: b for b in rows}


UNARY_MATH = ("exp log log1p expm1 sigmoid logsigmoid tanh softplus relu silu gelu elu abs sign "
              "sqrt rsqrt sin cos").split()

BUILTINS = _table(
    *(Builtin(n, (1, 1), "unary", doc="elementwise") for n in UNARY_MATH),
    Builtin("max", (2, 2), "bcast", doc="elementwise maximum of two values (amax reduces)"),
    Builtin("min", (2, 2), "bcast", doc="elementwise minimum of two values"),
    Builtin("logaddexp", (2, 2), "bcast", doc="log(exp(a) + exp(b)), stable"),
    Builtin("clamp", (3, 3), "bcast", doc="clamp(x, lo, hi)"),
    Builtin("where", (3, 3), "where", doc="where(mask, a, b)"),
    Builtin("sum", (1, 1), "reduce", ("axis",), doc="sum over axis (default the last)"),
    Builtin("mean", (1, 1), "reduce", ("axis",), doc="mean over axis (default the last)"),
    Builtin("amax", (1, 1), "reduce", ("axis",), doc="maximum over axis (default the last)"),
    Builtin("logsumexp", (1, 1), "reduce", ("axis",), doc="log-sum-exp over axis, stable"),
    Builtin("norm", (1, 1), "reduce", ("axis",), doc="Euclidean norm over axis (default the last)"),
    Builtin("l2norm", (1, 1), "lastaxis", doc="x / norm(x) along the last axis (eps 1e-6)"),
    Builtin("rmsnorm", (1, 1), "lastaxis", doc="x / sqrt(mean(x*x) + 1e-6) along the last axis"),
    Builtin("layernorm", (1, 1), "lastaxis", doc="(x - mean) / std along the last axis, no affine (extension)"),
    Builtin("softmax", (1, 1), "lastaxis", doc="softmax along the last axis (extension)"),
    Builtin("outer", (2, 2), "special", doc="[m], [n] -> [m, n]"),
    Builtin("dot", (2, 2), "special", doc="[n], [n] -> []"),
    Builtin("eye", (1, 1), "special", doc="identity matrix [n, n]"),
    Builtin("diag", (1, 1), "special", doc="[n] -> diagonal matrix [n, n]"),
    Builtin("split", (2, 2), "special", doc="split(x, n): n equal parts of the last axis"),
    Builtin("concat", (1, -1), "special", doc="concatenate along the last axis"),
    Builtin("reshape", (2, 2), "special", doc="reshape(x, [d1, d2, ...])"),
    Builtin("arange", (1, 2), "special", doc="arange(n) or arange(a, b): a constant vector"),
    Builtin("inv", (1, 1), "special", doc="inverse of a square matrix [n, n] of params and constants (computed "
                                          "once per forward, before the time loop)"),
    Builtin("solve", (2, 2), "special", doc="solve(A, B) = inv(A) @ B for A [n, n] and B [n, k] or [n] of params "
                                            "and constants (once per forward)"),
    Builtin("expm", (1, 1), "special", doc="matrix exponential of a square matrix [n, n] of params and constants "
                                           "(once per forward)"),
    Builtin("sum_in", (1, 1), "special", doc="sum over the node's incoming edges (over dag)"),
    Builtin("complex", (2, 2), "special", doc="complex(re, im): the complex value re + i*im of two real values"),
    Builtin("real", (1, 1), "special", doc="the real part of a complex value (of a real value: itself)"),
    Builtin("imag", (1, 1), "special", doc="the imaginary part of a complex value (of a real value: 0)"),
    Builtin("conj", (1, 1), "special", doc="the complex conjugate re - i*im"),
)

# Functions of params and constants only (no state, no input): computed once per forward.
PARAM_ONLY = ("inv", "solve", "expm")

# Complex values (docs/LANGUAGE.md, "Complex values"): the elementwise functions defined on
# them (exp(z) = exp(re) * (cos(im) + i*sin(im)), abs(z) = |z|, a real value); the others are
# refused on a complex argument with this hint.
COMPLEX_FUNCS = ("exp", "abs")
COMPLEX_HINT = ("apply it to a real value: real(z), imag(z) or abs(z); on complex values the language has + - * / @, "
                "exp, abs, real, imag, conj, complex(re, im), sum, mean, dot, outer and the structural functions")

# Initialisers of `param NAME[...] ~ dist(...)`.
DISTRIBUTIONS = {"normal": ("mean", "std"), "uniform": ("low", "high")}

OVER_KINDS = ("seq", "grid2d", "dag")
NEIGHBOURS = {"grid2d": ("left", "up"), "seq": ("prev",)}

# Words the language gives a meaning to; they cannot name a value.
LANGUAGE_KEYWORDS = {"cell", "input", "param", "state", "edge", "pair", "output", "heads", "over",
                     "for", "in", "on", "None", "range"}

# Functions an initialiser (`param b[H] = expr`, `state h[H] = expr`, the arguments of
# normal/uniform) and a hyper-parameter's default may call, besides arange: what
# recdsl.runtime evaluates (with torch) when it builds a module.
INIT_FUNCS = ("exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "abs", "log1p", "expm1")
# ... and, for complex initialisers (`param z[N] complex = -0.5 + 1j * arange(N)`), these.
INIT_COMPLEX_FUNCS = ("complex", "real", "imag", "conj")

# --- names the compiled module gives a meaning to -------------------------------------------
# Dimensions and hyper-parameters are keyword arguments of `spec(...)`, next to its options.
SPEC_OPTIONS = ("backend", "heads", "reverse", "dtype", "device")
# Inputs (edge and pair inputs too) are keyword arguments of `forward(...)` and `step(...)`.
FORWARD_OPTIONS = ("state", "reverse", "cu_seqlens", "edges", "flip")
# Params are attributes of the module (a torch.nn.Module): a param cannot take the name of an
# attribute it already has. TORCH_MODULE_API: every attribute of a torch.nn.Module instance
# (torch 2.x, dunders aside); LAYER_API: those recdsl's layer (recdsl.runtime.RecModule) adds.
# tests/frontend/test_hostile.py checks that they cover dir() of both, so a new torch or a new
# layer attribute fails that test until it is added here.
TORCH_MODULE_API = frozenset("""
T_destination _apply _backward_hooks _backward_pre_hooks _buffers _call_impl _compiled_call_impl
_forward_hooks _forward_hooks_always_called _forward_hooks_with_kwargs _forward_pre_hooks
_forward_pre_hooks_with_kwargs _get_backward_hooks _get_backward_pre_hooks _get_name _is_full_backward_hook
_load_from_state_dict _load_state_dict_post_hooks _load_state_dict_pre_hooks _maybe_warn_non_full_backward_hook
_modules _named_members _non_persistent_buffers_set _parameters _register_load_state_dict_pre_hook
_register_state_dict_hook _replicate_for_data_parallel _save_to_state_dict _slow_forward _state_dict_hooks
_state_dict_pre_hooks _version _wrapped_call_impl add_module apply bfloat16 buffers call_super_init children
compile cpu cuda double dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter
get_submodule half ipu load_state_dict modules mtia named_buffers named_children named_modules
named_parameters parameters register_backward_hook register_buffer register_forward_hook
register_forward_pre_hook register_full_backward_hook register_full_backward_pre_hook
register_load_state_dict_post_hook register_load_state_dict_pre_hook register_module register_parameter
register_state_dict_post_hook register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule
share_memory state_dict to to_empty train training type xpu zero_grad
""".split())
LAYER_API = frozenset("""
_GENERATED _build_program _check_graph_input _check_inputs _check_state _pair_input _compute_dtype _forward_graph _forward_varlen _lowered_with _pack
_compile_sig _param_shape _params _state_shapes _stored_params last_solve newton_options
_pick_backend _program _resolve_heads _run _step_fn backend_name compiled default_reverse dims generated
heads initial_state ir plan ran reset_parameters selection spec step
""".split())
MODULE_API = TORCH_MODULE_API | LAYER_API
