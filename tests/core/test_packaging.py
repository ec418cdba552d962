"""`pip install .` is plain Python: building the wheel runs no compiler and ships csrc sources.
The wheel holds `lightning_ops` and `lightning_ops.layers` (no collision-prone top-level
`layers`), requires torch but not triton (an extra) nor einops, and the unpacked wheel imports
from another directory without triton. (A full fresh-venv `pip install .` is too slow for every
run: the wheel is built once and unpacked instead.)"""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, PATH=str(tmp), CUDA_HOME="/nonexistent")  # no nvcc reachable
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp), ROOT], check=True, env=env, cwd=tmp)
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    assert len(wheels) == 1
    return tmp / wheels[0]


def test_wheel_builds_without_nvcc(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_ops/reference.py" in names
    if os.path.isfile(os.path.join(ROOT, "layers", "__init__.py")):
        # the layers ship under the library's namespace, from the layers/ sources
        assert "lightning_ops/layers/__init__.py" in names
        for f in os.listdir(os.path.join(ROOT, "layers")):
            if f.endswith(".py"):
                assert f"lightning_ops/layers/{f}" in names, f
        assert not any(n.startswith("layers/") for n in names)
    assert "lightning_ops/compat/fla/ops/gla/__init__.py" in names
    assert "lightning_ops/compat/mamba_ssm/ops/triton/ssd_combined.py" in names
    if os.path.isdir(os.path.join(ROOT, "csrc")) and any(
            f.endswith(".cu") for f in os.listdir(os.path.join(ROOT, "csrc"))):
        assert any(n.startswith("lightning_ops/csrc/") and n.endswith(".cu") for n in names)


def test_wheel_dependencies(wheel):
    zf = zipfile.ZipFile(wheel)
    meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in meta.splitlines()
            if ln.startswith("Requires-Dist:")]
    base = [r for r in reqs if "extra ==" not in r]
    assert any(r.startswith("torch") for r in base)
    assert not any(r.startswith("triton") for r in base), base          # an extra only
    assert any(r.startswith("triton") and 'extra == "triton"' in r for r in reqs), reqs
    assert not any(r.startswith("einops") for r in reqs), reqs           # never imported


def test_unpacked_wheel_imports_from_elsewhere_without_triton(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "layers.py").write_text("raise ImportError('a user layers.py: must not be hit')\n")
    code = (
        "import sys; sys.modules['triton'] = None\n"       # a CPU install without triton
        "import lightning_ops, lightning_ops.compat\n"
        f"assert lightning_ops.__file__.startswith({str(site)!r}), lightning_ops.__file__\n"
        "import torch\n"
        "q = torch.randn(1, 4, 1, 8, dtype=torch.float64)\n"
        "o, _ = lightning_ops.chunk_gla(q, q, q, -torch.rand(1, 4, 1, 8, dtype=torch.float64))\n"
        "from lightning_ops.compat.fla.ops.gla import chunk_gla\n"
        "layers_ok = True\n"
        "try:\n"
        "    import lightning_ops.layers as L\n"
        "    assert L.__file__.startswith(%r), L.__file__\n"
        "except ImportError as e:\n"
        "    layers_ok = repr(e)\n"
        "print('OK', layers_ok)\n" % str(site))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("OK"), r.stdout
    if os.path.isfile(os.path.join(ROOT, "layers", "__init__.py")):
        assert "OK True" in r.stdout, r.stdout


def test_source_tree_layers_shim():
    """In a checkout, lightning_ops.layers is the layers/ folder under the library's name."""
    if not os.path.isfile(os.path.join(ROOT, "layers", "__init__.py")):
        pytest.skip("no layers/ in this tree")
    code = ("import lightning_ops.layers as L, lightning_ops.layers.base as b\n"
            "print(L.__name__, b.__name__, b.__file__)")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    name, sub, path = r.stdout.split()
    assert (name, sub) == ("lightning_ops.layers", "lightning_ops.layers.base")
    assert path == os.path.join(ROOT, "layers", "base.py")
