"""A normal (non-editable) install works: the wheel built from the repository, installed into a
fresh venv, runs `recdsl check`, `inspect`, `fuzz` and every backend on a stdlib cell.

The fresh venv borrows only the third-party packages (torch, triton, lark, ...) of the test
venv through a path file, so nothing of the source tree or of the editable install is
importable there: recdsl comes from the wheel or not at all."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"recdsl": ROOT / "recdsl", "recdsl.backends": ROOT / "backends",
           "recdsl.grammar": ROOT / "grammar", "recdsl.stdlib": ROOT / "stdlib"}


def _folders() -> set[str]:
    """The shipped trees, and each folder in them that holds code or data, as dotted package names."""
    out = set(SHIPPED)
    for package, root in SHIPPED.items():
        for folder in [root, *root.rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__" and any(
                    f.is_file() and f.suffix in (".py", ".rec", ".lark", ".c", ".h") for f in folder.iterdir()):
                rel = folder.relative_to(root).parts
                out.add(".".join((package, *rel)))
    return out


def test_every_folder_ships():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert _folders() - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - _folders() == set(), "pyproject.toml lists folders that do not exist"


RUN_BACKENDS = r"""
import sys, torch, recdsl
assert "site-packages" in recdsl.__file__ and sys.prefix in recdsl.__file__, recdsl.__file__
torch.manual_seed(0)
results = {}
for backend in ("reference", "torch", "triton"):
    layer = recdsl.load("gla")(backend=backend, K=4, V=4)
    torch.manual_seed(1)
    inputs = {n: torch.randn(1, 6, *layer.ir.concrete(v.shape), requires_grad=True)
              for n, v in layer.spec.cell.inputs.items()}
    out, _ = layer(**inputs)
    out.sum().backward()
    results[backend] = out.detach()
    print(backend, layer.ran)
for backend in ("torch", "triton"):
    assert torch.allclose(results[backend], results["reference"], atol=1e-4), backend
print("backends agree")
"""


@pytest.mark.slow
def test_wheel_in_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("recdsl", "backends", "grammar", "stdlib"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("recdsl-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the test venv's third-party packages, without processing its .pth files (the editable hook)
    Path(purelib, "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True)

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(RECDSL_CACHE=str(tmp_path / "cache"), TRITON_INTERPRET="1")
    recdsl = env_dir / "bin" / "recdsl"

    def run(*args, **kw):
        done = subprocess.run([str(a) for a in args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    assert "gla: ok" in run(recdsl, "check", "gla")
    assert "def " in run(recdsl, "inspect", "gla", "--stage", "torch")
    assert "tl." in run(recdsl, "inspect", "gla", "--stage", "triton")
    run(recdsl, "fuzz", "--seconds", "5", "--max-cells", "2", "--no-shrink", "--out", work / "fuzz-out")
    out = run(python, "-c", RUN_BACKENDS)
    assert "backends agree" in out
