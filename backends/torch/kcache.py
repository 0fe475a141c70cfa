"""The on-disk cache of compiled kernels, and how it repairs itself.

The CPU backend compiles generated C into shared objects and loads them with ctypes: the
scan library (cpu_kernels.py, `scans-<key>.so`) and the fused loops (fused_loop.py,
`loop-<key>.so`); the Triton AOT compiler stores its results here too (triton/aot.py).
They live in one directory, $RECDSL_CACHE (default ~/.cache/recdsl), which the user
owns and anything can damage: a build killed half way, a full disk, a copy from another
machine, a read-only home. The rules:

* An entry is `<stem>.so` plus `<stem>.stamp` (JSON: the file name, its size and sha256).
  Both are written into a private temp dir inside the cache and moved into place with
  os.replace, the stamp AFTER the .so is complete, so a reader sees whole files or none.
* A .so is dlopen'ed only after its stamp matches it (a truncated .so mapped into the
  process is a `Bus error` at the first call into the missing pages, with no exception
  to catch). A missing, damaged or foreign stamp, a .so that does not load or lacks a
  symbol: the entry is rebuilt and replaced.
* A fresh build is loaded from its temp path (a path no other load used, so the dynamic
  loader cannot hand back an earlier, bad object of the same name), then published.
  Two processes building one key both end with a library; the last rename wins.
* A cache that is not a writable directory (read-only, or a file): one warning naming the
  path and RECDSL_CACHE, and this process builds into a private temp dir (removed at exit).
  Valid entries of a read-only cache are still used.
* Each build removes temp dirs of ours older than STALE_S (a build killed by SIGKILL
  leaves one behind), and the leftovers of the previous layout (`tmp*` dirs).
* Loaded libraries are memoised per process; `reset()` forgets them (tests)."""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

ENV = "RECDSL_CACHE"
TMP_PREFIX = ".recdsl-tmp-"      # our temp dirs inside a cache dir
STALE_S = 3600.0                 # a temp dir this old belongs to a build that died
_LEGACY_FILES = {"scans.so", "loop.c", "loop.so"}   # what the previous layout's tmp* dirs held

_lock = threading.RLock()
_memo: dict[tuple[str, str], ctypes.CDLL] = {}     # (cache dir, stem) -> loaded library
_private: dict[str, Path] = {}                      # unusable cache dir -> this process's private dir
_resets: list[Callable[[], None]] = []


class CacheWarning(UserWarning):
    """A compiled kernel or the cache cannot be used as configured (the process goes on without)."""


class BuildError(RuntimeError):
    """A kernel could not be built or loaded (the caller falls back)."""


def cache_root() -> Path:
    return Path(os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "recdsl"))


def on_reset(fn: Callable[[], None]) -> None:
    """Register a memo of another module for `reset()` to clear."""
    _resets.append(fn)


def reset() -> None:
    """Forget every loaded library and private dir of this process (tests: after pointing
    RECDSL_CACHE elsewhere). Libraries already loaded stay mapped for whoever holds them."""
    with _lock:
        _memo.clear()
        for d in _private.values():
            shutil.rmtree(d, ignore_errors=True)
        _private.clear()
        for fn in _resets:
            fn()


@atexit.register
def _remove_private() -> None:
    for d in _private.values():
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- directories
def _dirs(root: Path) -> list[Path]:
    """Where entries of `root` may be found: root itself, then this process's private dir."""
    return [root] + ([_private[str(root)]] if str(root) in _private else [])


def _private_dir(root: Path, why: OSError) -> Path:
    key = str(root)
    if key not in _private:
        _private[key] = Path(tempfile.mkdtemp(prefix="recdsl-cache-"))
        reason = "it is a file" if root.is_file() else (why.strerror or type(why).__name__)
        warnings.warn(f"recdsl: the kernel cache {root} is not a writable directory ({reason}), so compiled "
                      f"kernels go to {_private[key]} for this process only; set {ENV} to a writable "
                      f"directory to keep them", CacheWarning, stacklevel=4)
    return _private[key]


def _workdir(root: Path) -> tuple[Path, Path]:
    """(the directory to publish into, a fresh temp dir inside it): root when it is a
    writable directory, else the private dir (with the warning)."""
    try:
        root.mkdir(parents=True, exist_ok=True)   # FileExistsError when root is a file
        clean_stale(root)
        return root, Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    except OSError as e:
        d = _private_dir(root, e)
        return d, Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=d))


def clean_stale(d: Path, age: float = STALE_S) -> list[str]:
    """Remove temp dirs and files of dead builds from `d` (older than `age` seconds); the
    names removed."""
    gone = []
    cutoff = time.time() - age
    try:
        entries = list(os.scandir(d))
    except OSError:
        return gone
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
            if st.st_mtime >= cutoff:
                continue
            if e.name.startswith(TMP_PREFIX) and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            elif e.name.startswith(TMP_PREFIX):
                os.unlink(e.path)
            elif d.name == "triton-aot" and e.name.startswith("tmp") and e.name.endswith(".tmp") \
                    and e.is_file(follow_symlinks=False):
                os.unlink(e.path)      # tempfile.mkstemp of the AOT cache's previous layout
            elif len(e.name) == 11 and e.name.startswith("tmp") and e.is_dir(follow_symlinks=False) \
                    and set(os.listdir(e.path)) & _LEGACY_FILES and set(os.listdir(e.path)) <= _LEGACY_FILES:
                shutil.rmtree(e.path)  # tempfile.TemporaryDirectory of the previous layout
            else:
                continue
            gone.append(e.name)
        except OSError:
            continue
    return gone


# ---------------------------------------------------------------- stamps
def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _stamped(d: Path, stem: str) -> bool:
    """The entry `stem` of `d` is whole and is the one its stamp describes."""
    so, stamp = d / f"{stem}.so", d / f"{stem}.stamp"
    try:
        if stamp.stat().st_size > 4096:
            return False
        meta = json.loads(stamp.read_text())
        if not (isinstance(meta, dict) and meta.get("file") == so.name):
            return False
        if so.stat().st_size != meta.get("size"):
            return False
        return _digest(so) == (meta["size"], meta.get("sha256"))
    except (OSError, ValueError, KeyError):
        return False


def _write_atomic(tmp: Path, dest: Path, data: bytes) -> None:
    part = tmp / (dest.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, dest)


# ---------------------------------------------------------------- libraries
def _open(path: Path, symbols: Iterable[str]) -> ctypes.CDLL:
    """dlopen `path` and check it exports `symbols` (BuildError otherwise)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"{path.name} does not load: {e}") from None
    missing = [s for s in symbols if not hasattr(lib, s)]
    if missing:
        raise BuildError(f"{path.name} lacks {', '.join(missing)}")
    return lib


def load_library(stem: str, build: Callable[[Path], None], symbols: Iterable[str],
                 root: Path | None = None) -> ctypes.CDLL:
    """The library `<stem>.so` of the cache: loaded if its entry is valid, else built by
    `build(path)` (which writes a shared object at `path` or raises BuildError), loaded,
    and published with its stamp. BuildError (or OSError) when it cannot be had."""
    root = root or cache_root()
    symbols = tuple(symbols)
    with _lock:
        if (str(root), stem) in _memo:
            return _memo[(str(root), stem)]
        lib = None
        for d in _dirs(root):
            if _stamped(d, stem):   # never dlopen an unvalidated file
                try:
                    lib = _open(d / f"{stem}.so", symbols)
                    break
                except BuildError:
                    pass            # stamped but unusable (another machine's?): rebuild it
        if lib is None:
            lib = _build(root, stem, build, symbols)
        _memo[(str(root), stem)] = lib
        return lib


def _build(root: Path, stem: str, build: Callable[[Path], None], symbols: tuple[str, ...]) -> ctypes.CDLL:
    d, tmp = _workdir(root)
    try:
        so = tmp / f"{stem}.so"
        build(so)
        lib = _open(so, symbols)    # from the temp path: see the module docstring
        try:
            os.replace(so, d / so.name)
            # the stamp describes the file now in place (a concurrent builder's rename may
            # have come after ours; every file renamed there is whole)
            size, sha = _digest(d / so.name)
            meta = {"file": so.name, "size": size, "sha256": sha}
            _write_atomic(tmp, d / f"{stem}.stamp", json.dumps(meta).encode())
        except OSError as e:        # loaded anyway; the next process builds again
            warnings.warn(f"recdsl: could not store {so.name} in the kernel cache {d} ({e.strerror or e})",
                          CacheWarning, stacklevel=4)
        return lib
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- plain files (triton/aot.py)
def find_file(root: Path, name: str) -> list[Path]:
    """Where an entry `name` of `root` may be (existing files, the cache first)."""
    return [d / name for d in _dirs(root) if (d / name).is_file()]


def store_file(root: Path, name: str, data: bytes) -> Path:
    """Write `name` into `root` atomically (or into the private dir, with the warning)."""
    with _lock:
        d, tmp = _workdir(root)
        try:
            _write_atomic(tmp, d / name, data)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return d / name
