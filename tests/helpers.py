"""Shared test helpers (tests/ is on sys.path through the top-level conftest)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE_MD = ROOT.parent / "shared" / "LANGUAGE.md"


def language_examples() -> dict[str, str]:
    """name -> source of every cell example of LANGUAGE.md (the stdlib copies when the
    shared folder is absent, so the tests still run on a lone clone)."""
    if LANGUAGE_MD.exists():
        out = {}
        for block in re.findall(r"```\n(.*?)```", LANGUAGE_MD.read_text(), flags=re.S):
            m = re.search(r"^cell\s+(\w+)", block, flags=re.M)
            if m:
                out[m.group(1)] = block
        return out
    from recdsl.spec import stdlib_files
    out = {}
    for p in stdlib_files().values():
        m = re.search(r"^cell\s+(\w+)", p.read_text(), flags=re.M)
        out[m.group(1)] = p.read_text()
    return out


def random_inputs(spec, layer, B, T, dtype, seed=0, scale=0.5):
    """Random inputs for a module: N(0, scale^2), except inputs whose name suggests a log
    gate (gk, g, lf, w...) which are made negative so decays stay below one."""
    import torch
    g = torch.Generator().manual_seed(seed)
    heads = (layer.heads,) if layer.heads else ()
    xs = {}
    for name, var in spec.cell.inputs.items():
        shape = (B, T) + heads + layer.ir.concrete(var.shape)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if name in ("gk", "g", "gv", "w", "log_decay"):
            x = -x.abs()
        xs[name] = x.to(dtype)
    return xs


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def paired_layers(spec, backend, dims, heads=None, dtype=None, seed=0):
    """(reference layer, `backend` layer) with the same parameters (drawn under `seed`), float64
    unless `dtype` says otherwise."""
    import torch
    dtype = dtype or torch.float64
    torch.manual_seed(seed)
    ref = spec(backend="reference", heads=heads, **dims).to(dtype)
    other = spec(backend=backend, heads=heads, **dims).to(dtype)
    other.load_state_dict(ref.state_dict())
    return ref, other


def compare_backends(spec, dims, backend, B=2, T=11, dtype=None, seed=0, grads=True, heads=None, **call):
    """Run `backend` and `reference` on the same random data; return the max abs errors of
    outputs, final states and gradients (inputs and params)."""
    import torch
    dtype = dtype or torch.float64
    ref, other = paired_layers(spec, backend, dims, heads, dtype, seed)
    xs = random_inputs(spec, ref, B, T, dtype, seed)
    xs = {k: v.requires_grad_() for k, v in xs.items()} if grads else xs
    o1, s1 = ref(**xs, **call)
    o2, s2 = other(**xs, **call)
    o1, o2 = as_tuple(o1), as_tuple(o2)
    errs = {"out": max(float((a - b).detach().abs().max()) for a, b in zip(o1, o2)),
            "state": max(float((s1[k] - s2[k]).detach().abs().max()) for k in s1)}
    if grads:
        w = [torch.randn(a.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1)) for a in o1]
        l1 = sum((a * c).sum() for a, c in zip(o1, w)) + sum(v.sum() for v in s1.values())
        l2 = sum((a * c).sum() for a, c in zip(o2, w)) + sum(v.sum() for v in s2.values())
        p1 = [p for p in ref.parameters()]
        p2 = [p for p in other.parameters()]
        g1 = torch.autograd.grad(l1, list(xs.values()) + p1, allow_unused=True)
        g2 = torch.autograd.grad(l2, list(xs.values()) + p2, allow_unused=True)
        errs["grad"] = max((float((a - b).abs().max()) for a, b in zip(g1, g2) if a is not None and b is not None),
                           default=0.0)
    scale = max(float(a.detach().abs().max()) for a in o1) if o1 else 1.0
    errs["scale"] = scale
    return errs


def grad_inputs(spec, layer, B, T, seed=0):
    """random_inputs in float64, each requiring grad."""
    import torch
    return {k: v.requires_grad_() for k, v in random_inputs(spec, layer, B, T, torch.float64, seed).items()}


def random_initial_state(spec, layer, B, seed=5):
    """A random float64 initial state (requiring grad) of the shapes `layer` returns."""
    import torch
    _, shapes = layer(**grad_inputs(spec, layer, B, 1))
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
            for k, v in shapes.items()}


def outputs_and_grads(layer, xs, state, **call):
    """Outputs, final states and the gradients (inputs, initial state, params) of a random
    linear function of both."""
    import torch
    out, fin = layer(**xs, state=state, **call)
    out = as_tuple(out)
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in out)
    loss = loss + sum((s * 0.3).sum() for s in fin.values())
    wrt = list(xs.values()) + list(state.values()) + list(layer.parameters())
    return out, fin, torch.autograd.grad(loss, wrt, allow_unused=True)


def reference_errors(spec, dims, B, T, dtype, heads=None, seed=0, *, kernel, backend="triton", **call):
    """Max abs errors {"out", "state", "grad"} of `backend` against the reference backend, from
    a random initial state whose gradient is compared too, and the outputs' scale ("scale",
    at least 1). Asserts that `kernel` ran and that every input and the initial state get a
    gradient (on both sides alike). `call`: reverse=, cu_seqlens= (one initial state per
    sequence then)."""
    import torch
    ref, other = paired_layers(spec, backend, dims, heads, dtype, seed)
    xs = {k: v.requires_grad_() for k, v in random_inputs(spec, ref, B, T, dtype, seed).items()}
    _, shapes = ref(**{k: v[:, :1].detach() for k, v in xs.items()})
    n_rows = len(call["cu_seqlens"]) - 1 if "cu_seqlens" in call else B
    g = torch.Generator().manual_seed(seed + 2)
    st = {k: (0.5 * torch.randn((n_rows,) + v.shape[1:], generator=g, dtype=torch.float64)).to(dtype)
          .requires_grad_() for k, v in shapes.items() if torch.is_floating_point(v)}
    (o1, s1), (o2, s2) = ref(**xs, state=st, **call), other(**xs, state=st, **call)
    assert kernel in other.ran, other.ran
    o1, o2 = as_tuple(o1), as_tuple(o2)
    errs = {"out": max(float((a - b).detach().abs().max()) for a, b in zip(o1, o2)),
            "state": max(float((s1[k] - s2[k]).detach().abs().max()) for k in s1)}
    w = [torch.randn(a.shape, generator=g, dtype=torch.float64).to(dtype) for a in o1]
    leaves = list(xs.values()) + list(st.values())
    grads = []
    for layer, outs, states in ((ref, o1, s1), (other, o2, s2)):
        loss = sum((a * c).sum() for a, c in zip(outs, w)) + sum(v.sum() for v in states.values())
        grads.append(torch.autograd.grad(loss, leaves + list(layer.parameters()), allow_unused=True))
    assert all((a is None) == (b is None) for a, b in zip(*grads))
    assert all(a is not None for a in grads[0][:len(leaves)])      # every input and the initial state
    errs["grad"] = max((float((a - b).abs().max()) for a, b in zip(*grads) if a is not None), default=0.0)
    errs["scale"] = max(1.0, max(float(a.detach().abs().max()) for a in o1))
    return errs


def assert_close(errs, tol=1e-10):
    """reference_errors within tol of the outputs' scale (gradients within 10 tol)."""
    scale = errs["scale"]
    assert errs["out"] <= tol * scale and errs["state"] <= tol * scale and errs["grad"] <= 10 * tol * scale, errs


def launch_counter(module, monkeypatch) -> dict:
    """kernel name -> launches of a fixed Triton kernel module's kernels from now on (a spy on
    its `_launcher`, the one place its kernels are launched from)."""
    counts: dict = {}
    real = module._launcher

    def spying(*how):   # (ns, device[, blocks]): as the module's own _launcher takes them
        launch = real(*how)

        def counted(name, grid):
            counts[name] = counts.get(name, 0) + 1
            return launch(name, grid)
        return counted
    monkeypatch.setattr(module, "_launcher", spying)
    return counts
