"""The wheel: builds without setuptools warnings about its metadata, and works installed outside the repository."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("setuptools", minversion="77", reason="building selopt needs setuptools >= 77 (pyproject.toml)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """A wheel built from a copy of the sources (the repository is left as it is), and the build's output."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("selopt", "kernels"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), "-v",
         str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = out.glob("selopt-*.whl")
    return path, build.stdout + build.stderr


def test_wheel_metadata_and_contents(wheel):
    path, log = wheel
    assert "deprecated" not in log.lower(), "setuptools warned about the metadata"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(archive.read(metadata))
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    assert "torch>=2.4" in requires
    assert 'triton<3.10,>=3.6; extra == "triton"' in requires
    assert set(meta.get_all("Provides-Extra")) == {"triton", "test", "demo", "hf"}
    for module in ("selopt/optim.py", "selopt/stats.py", "selopt/hf.py", "selopt/kernels/adamw.py"):
        assert module in names
    assert not any(n.startswith(("kernels/", "bench/", "tests/")) for n in names)  # no top-level `kernels`


def test_installed_wheel_works_outside_the_repository(wheel, tmp_path):
    path, _ = wheel
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(path)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    script = (
        "import torch, selopt\n"
        "assert selopt.__file__.startswith(%r), selopt.__file__\n"
        "model = torch.nn.Linear(10, 10, bias=False)\n"
        "opt = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0), lr=1e-3, fraction=0.1)\n"
        "opt.track_updates()\n"
        "model(torch.randn(2, 10)).square().sum().backward(); opt.step()\n"
        "print(opt.update_stats().groups[0].moved)\n" % str(target)
    )
    # A neutral directory, and only the installed copy and the environment's packages on the path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "10"  # floor(0.1 * 100): param_groups leaves the fraction to the optimizer
