"""The kernel cache (backends/torch/kcache.py) repairs itself: a damaged, empty, foreign or
unstamped `scans-*.so` / `loop-*.so` is rebuilt (never dlopen'ed: a truncated shared
object is a `Bus error` that kills the process), a cache that is read-only or a file warns
and builds into a private dir, dead builds' temp dirs are removed, and a fused loop that
cannot be built runs the per-step torch loop -- with the plan saying so when that is
known at selection. Numbers are checked against the reference backend: a scan cell
(mingru: the C scan library) and an LSTM (the fused C loop).

The damaged-file cases run in a subprocess, so that a regression is a failed test, not a
crashed pytest."""
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.backends.torch import cpu_kernels, fused_loop, kcache

CELLS = ("mingru", "lstm")   # an element scan (the scan library), a loop (the fused C loop)

def compare_cells(cells) -> dict:
    """Runs the cells on the torch and reference backends without gradients (the fused loop's
    mode): the largest difference per cell (outputs and final states), the warnings raised
    ([category name, message]), whether the scan library loaded, the fused loops built. Also
    the CHILD's whole work, shipped as this function's source (self-contained)."""
    import warnings

    import torch

    import recdsl
    from recdsl.backends.torch import cpu_kernels, kcache

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, dict):
            x = [x[k] for k in sorted(x)]
        return [t for v in x for t in tensors(v)]

    out = {"err": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cell in cells:
            spec = recdsl.load(cell)
            dims = spec.analysis_dims()
            ref = spec(backend="reference", **dims).double()
            fast = spec(backend="torch", **dims).double()
            fast.load_state_dict(ref.state_dict())
            g = torch.Generator().manual_seed(0)
            xs = {n: 0.5 * torch.randn((2, 9) + ref.ir.concrete(v.shape), generator=g, dtype=torch.float64)
                  for n, v in spec.cell.inputs.items()}
            with torch.no_grad():
                a, b = tensors(ref(**xs)), tensors(fast(**xs))
            out["err"][cell] = max((x - y).abs().max().item() for x, y in zip(a, b))
    out["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
    out["c"] = cpu_kernels.available()
    out["loops"] = sorted(stem for _, stem in kcache._memo if stem.startswith("loop-"))
    return out


CHILD = (textwrap.dedent(inspect.getsource(compare_cells))
         + f"\nimport json\nprint('RESULT ' + json.dumps(compare_cells({CELLS!r})))\n")


def _child(cache: Path) -> subprocess.Popen:
    env = {**os.environ, "RECDSL_CACHE": str(cache)}
    env.pop("RECDSL_NO_CC", None)
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}):\n{stderr[-3000:]}"
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _run(cache: Path) -> dict:
    return _result(_child(cache))


def _check_good(res: dict, warned: bool = False) -> None:
    assert res["c"], "the scan library did not load"
    assert res["loops"], "the LSTM did not run its fused C loop"
    for cell in CELLS:
        assert res["err"][cell] < 1e-10, res
    assert bool(res["warnings"]) == warned, res["warnings"]


def _entries(d: Path) -> dict[str, Path]:
    """{"scans": path, "loop": path} of the .so files in d."""
    return {p.name.split("-")[0]: p for p in d.glob("*.so")}


def _valid(d: Path) -> None:
    """Both entries of d are whole and stamped."""
    ents = _entries(d)
    assert set(ents) == {"scans", "loop"}, sorted(os.listdir(d))
    for p in ents.values():
        assert kcache._stamped(d, p.stem), f"{p.name} is not a valid entry after the run"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A cache holding good, stamped entries of both libraries (built by a child process)."""
    d = tmp_path_factory.mktemp("pristine")
    _check_good(_run(d))
    _valid(d)
    return d


@pytest.fixture
def cache(tmp_path, pristine) -> Path:
    d = tmp_path / "cache"
    shutil.copytree(pristine, d)
    return d


@pytest.fixture
def fresh(monkeypatch):
    """In-process: RECDSL_CACHE is set by the test; memos are forgotten before and after."""
    monkeypatch.delenv("RECDSL_NO_CC", raising=False)
    kcache.reset()
    yield
    kcache.reset()


# ---------------------------------------------------------------- damaged entries (subprocess)
def _damage(cache: Path, how: str) -> None:
    ents = _entries(cache)
    for kind, so in ents.items():
        data = so.read_bytes()
        if how == "truncated":            # a build or copy cut short; its stamp is the good one's
            so.write_bytes(data[:len(data) // 2])
        elif how == "truncated_unstamped":   # ... in the previous layout (no stamps at all)
            so.write_bytes(data[:len(data) // 2])
            so.with_suffix(".stamp").unlink()
        elif how == "unstamped":             # a good file, but nothing says so: not trusted
            so.with_suffix(".stamp").unlink()
        elif how == "empty":
            so.write_bytes(b"")
        elif how == "garbage":
            so.write_bytes(b"\x7fELF" + os.urandom(4096))
            so.with_suffix(".stamp").write_bytes(os.urandom(64))
    if how.startswith("foreign"):
        # each library renamed to the other's name (stamps too): a valid .so of another key
        (s, l) = ents["scans"], ents["loop"]
        tmp = cache / "swap"
        for a, b in ((s, tmp), (l, s), (tmp, l)):
            a.rename(b)
        for a, b in ((s.with_suffix(".stamp"), tmp), (l.with_suffix(".stamp"), s.with_suffix(".stamp")),
                     (tmp, l.with_suffix(".stamp"))):
            a.rename(b)
        if how == "foreign_restamped":   # stamps made to match: only the symbol check tells
            for so in (s, l):
                size, sha = kcache._digest(so)
                so.with_suffix(".stamp").write_text(json.dumps({"file": so.name, "size": size, "sha256": sha}))
                assert kcache._stamped(cache, so.stem)


@pytest.mark.parametrize("how", ["truncated", "truncated_unstamped", "empty", "garbage", "foreign",
                                 "foreign_restamped", "unstamped"])
def test_damaged_entry_is_rebuilt(cache, how):
    _damage(cache, how)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    _check_good(_run(cache))
    _valid(cache)
    if how == "truncated":   # the next process loads what the first one rebuilt, as it is
        rebuilt = {p.name: p.read_bytes() for p in cache.iterdir()}
        assert rebuilt != before
        _check_good(_run(cache))
        assert {p.name: p.read_bytes() for p in cache.iterdir()} == rebuilt


# Builds a tiny library through kcache; the build waits until both processes are in it.
RACER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from recdsl.backends.torch import cpu_kernels, kcache
    here = Path(sys.argv[1])

    def build(out):
        src = out.with_suffix(".c")
        src.write_text("int answer(void) { return 42; }\\n")
        subprocess.run([cpu_kernels._compiler(), "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
        (here / ("in-build-" + sys.argv[2])).touch()
        deadline = time.time() + 60
        while len(list(here.glob("in-build-*"))) < 2 and time.time() < deadline:
            time.sleep(0.02)

    lib = kcache.load_library("answer-0", build, ["answer"])
    print("RESULT", lib.answer())
""")


def test_two_processes_build_one_key_at_once(tmp_path):
    """Both build at the same time (each waits in its build for the other); both end with a
    library that works, and the cache with one valid entry, whichever rename came last."""
    cache = tmp_path / "cache"
    env = {**os.environ, "RECDSL_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(n)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in (41, 42)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert [out.split()[-1] for out, _ in outs] == ["42", "42"]
    assert kcache._stamped(cache, "answer-0")
    assert sorted(os.listdir(cache)) == ["answer-0.so", "answer-0.stamp"]   # no temp dir left behind


# ---------------------------------------------------------------- unusable caches (in process)
def _run_here() -> tuple[dict, list[str]]:
    """The CHILD's work in this process: errors per cell and the cache's warnings."""
    res = compare_cells(CELLS)
    assert res["c"], cpu_kernels.unavailable_reason()
    assert res["loops"], "the LSTM did not run its fused C loop"
    assert all(e < 1e-10 for e in res["err"].values()), res["err"]
    return res["err"], [msg for cat, msg in res["warnings"] if cat == kcache.CacheWarning.__name__]


def _warned_once_about(path: Path, msgs: list[str]) -> None:
    assert len(msgs) == 1, msgs
    assert str(path) in msgs[0] and "RECDSL_CACHE" in msgs[0], msgs[0]


def test_cache_path_is_a_file(tmp_path, monkeypatch, fresh):
    path = tmp_path / "cache"
    path.write_text("not a directory\n")
    monkeypatch.setenv("RECDSL_CACHE", str(path))
    _, msgs = _run_here()
    _warned_once_about(path, msgs)
    assert path.read_text() == "not a directory\n"
    private = kcache._private[str(path)]
    assert set(_entries(private)) == {"scans", "loop"}
    kcache.reset()
    assert not private.exists()      # the private dir lives as long as the process (or a reset)


def _binds(path: Path) -> bool:
    """chmod 0o500 keeps this process from writing into `path` (not so for root, unless
    it runs without CAP_DAC_OVERRIDE)."""
    try:
        (path / "probe").write_bytes(b"")
    except PermissionError:
        return True
    (path / "probe").unlink()
    return False


def test_read_only_cache(tmp_path, monkeypatch, fresh):
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o500)
    if os.geteuid() == 0 and not _binds(path):
        # chmod does not bind root: an unwritable cache here is one whose path is a file
        path.rmdir()
        path.write_bytes(b"")
    try:
        monkeypatch.setenv("RECDSL_CACHE", str(path))
        _, msgs = _run_here()
        _warned_once_about(path, msgs)
        if path.is_dir():
            assert os.listdir(path) == []
    finally:
        if path.is_dir():
            path.chmod(0o700)


def test_read_only_cache_with_valid_entries_is_used(cache, monkeypatch, fresh):
    """A read-only cache (a shared, pre-built one) serves its valid entries without a
    warning. Unwritable is emulated by refusing temp dirs in it, which binds root too."""
    real = kcache.tempfile.mkdtemp

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and Path(dir) == cache:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(kcache.tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setenv("RECDSL_CACHE", str(cache))
    _, msgs = _run_here()
    assert msgs == []
    assert not kcache._private
    # ... and a damaged entry in it is rebuilt privately, with the warning
    kcache.reset()
    loop = _entries(cache)["loop"]
    # damaged by replacing the file, not by writing into it: this process has the good one
    # mapped (the run above loaded it), and cutting a mapped file short is a SIGBUS here
    damaged = cache / "damaged.tmp"
    damaged.write_bytes(loop.read_bytes()[:100])
    os.replace(damaged, loop)
    _, msgs = _run_here()
    _warned_once_about(cache, msgs)
    assert set(_entries(kcache._private[str(cache)])) == {"loop"}


# ---------------------------------------------------------------- temp dirs of dead builds
def test_stale_temp_dirs_are_removed_on_build(tmp_path, monkeypatch, fresh):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = time.time() - 2 * kcache.STALE_S

    def make(name, files=("x.so",), age=old, is_dir=True):
        p = cache / name
        if is_dir:
            p.mkdir()
            for f in files:
                (p / f).write_bytes(b"half")
        else:
            p.write_bytes(b"half")
        os.utime(p, (age, age))
        return p

    dead = make(kcache.TMP_PREFIX + "abc123")             # ours, killed mid-compile an hour ago
    legacy = make("tmpq1w2e3r4", files=("loop.c", "loop.so"))   # the previous layout's temp dir
    legacy_aot = make("tmpzz9.tmp", is_dir=False)         # not in triton-aot/: not the AOT cache's, kept
    live = make(kcache.TMP_PREFIX + "def456", age=time.time())   # a build running now
    theirs = make("tmpmine1234", files=("notes.txt",))    # not ours: kept whatever its age
    monkeypatch.setenv("RECDSL_CACHE", str(cache))

    def build(out: Path) -> None:
        src = out.with_suffix(".c")
        src.write_text("int answer(void) { return 42; }\n")
        r = subprocess.run([cpu_kernels._compiler(), "-shared", "-fPIC", str(src), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    lib = kcache.load_library("answer-0", build, ["answer"])
    assert lib.answer() == 42
    assert not dead.exists() and not legacy.exists()
    assert live.exists() and theirs.exists() and legacy_aot.exists()
    assert sorted(os.listdir(cache)) == sorted(["answer-0.so", "answer-0.stamp", live.name, theirs.name,
                                                legacy_aot.name])
    aot = cache / "triton-aot"                           # the AOT cache's previous temp files
    aot.mkdir()
    (aot / "tmpab12cd34.tmp").write_bytes(b"{")
    os.utime(aot / "tmpab12cd34.tmp", (old, old))
    kcache.store_file(aot, "k.json", b"{}")
    assert sorted(os.listdir(aot)) == ["k.json"]


# ---------------------------------------------------------------- the fused loop's fallbacks
def _lstm():
    spec = recdsl.load("lstm")
    dims = spec.analysis_dims()
    ref = spec(backend="reference", **dims).double()
    fast = spec(backend="torch", **dims).double()
    fast.load_state_dict(ref.state_dict())
    x = 0.5 * torch.randn(2, 9, dims["D"], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ref, fast, x


def test_no_toolchain_is_decided_at_selection(cache, monkeypatch, fresh):
    """Without a compiler the plan says the loop runs per step, and that is what is emitted."""
    monkeypatch.setenv("RECDSL_CACHE", str(cache))
    monkeypatch.setenv("RECDSL_NO_CC", "1")
    ref, fast, x = _lstm()
    stage = fast.selection.stages[0]
    assert stage.kernel.name == "torch.loop"
    assert [p.reason for p in stage.passed if p.kernel == "torch.c_loop"] == ["no C loop: no C compiler (cc/gcc/clang) found"]
    assert "usable(" not in fast.compiled.program.source   # no fused branch in the generated forward
    with torch.no_grad():
        (o1, s1), (o2, s2) = ref(x=x), fast(x=x)
    assert torch.allclose(o1, o2, atol=1e-12) and all(torch.allclose(s1[k], s2[k], atol=1e-12) for k in s1)


def test_fused_loop_that_does_not_build_falls_back_with_a_warning(cache, monkeypatch, fresh):
    """The toolchain works (the plan promises the C loop) but this loop's build fails:
    one warning, and the per-step torch loop runs."""
    monkeypatch.setenv("RECDSL_CACHE", str(cache))

    def broken(src):
        raise kcache.BuildError("the generated step did not compile: (simulated)")

    monkeypatch.setattr(fused_loop, "_compile", broken)
    ref, fast, x = _lstm()
    assert fast.selection.stages[0].kernel.name == "torch.c_loop"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            (o1, s1), (o2, s2), (o3, _) = ref(x=x), fast(x=x), fast(x=x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, kcache.CacheWarning)]
    assert len(msgs) == 1 and "per-step torch loop" in msgs[0] and "simulated" in msgs[0], msgs
    assert torch.allclose(o1, o2, atol=1e-12) and torch.equal(o2, o3)
    assert all(torch.allclose(s1[k], s2[k], atol=1e-12) for k in s1)
    assert fast.ran == ["torch.loop"]   # what ran, not what was planned


# ---------------------------------------------------------------- the Triton AOT cache
def test_aot_cache_entries(tmp_path, monkeypatch, fresh):
    """triton/aot.py keeps its JSON entries through kcache: a copied (foreign) entry is
    refused, and a cache path that is a file warns and keeps them in the private dir."""
    aot = pytest.importorskip("recdsl.backends.triton.aot")
    c = aot.Compiled(name="k", arch=90, asm={"ttir": "", "ttgir": "", "llir": "", "ptx": "", "cubin": b"\0\1"},
                     shared=0, registers=8, spill_stores=0, spill_loads=0, stack=0, num_warps=4)
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path / "cache"))
    aot._store("k1", c)
    (path,) = kcache.find_file(aot.cache_dir(), "k1.json")
    assert aot._load(path, "k1") == c
    shutil.copy(path, aot.cache_dir() / "k2.json")
    with pytest.raises(ValueError):
        aot._load(aot.cache_dir() / "k2.json", "k2")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path / "file"))
    with pytest.warns(kcache.CacheWarning, match="RECDSL_CACHE"):
        aot._store("k1", c)
    (path,) = kcache.find_file(aot.cache_dir(), "k1.json")
    assert aot._load(path, "k1") == c and str(path).startswith(str(kcache._private[str(aot.cache_dir())]))
