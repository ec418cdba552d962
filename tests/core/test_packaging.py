"""`pip install .` is plain Python: building the wheel runs no compiler and ships csrc sources."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_builds_without_nvcc(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), CUDA_HOME="/nonexistent")  # no nvcc reachable
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), ROOT], check=True, env=env, cwd=tmp_path)
    wheels = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert len(wheels) == 1
    names = zipfile.ZipFile(tmp_path / wheels[0]).namelist()
    assert "lightning_ops/reference.py" in names
    assert any(n.startswith("layers/") for n in names) or not os.path.isdir(f"{ROOT}/layers")
    if os.path.isdir(os.path.join(ROOT, "csrc")) and any(
            f.endswith(".cu") for f in os.listdir(os.path.join(ROOT, "csrc"))):
        assert any(n.startswith("lightning_ops/csrc/") and n.endswith(".cu") for n in names)
