"""The distribution claims one import name: the wheel holds `aa_deploy` and nothing else at its top.

The repository keeps calibration/ and converters/ as top-level folders; setuptools' package-dir
installs them as aa_deploy.calibration and aa_deploy.converters. These tests build the wheel the way
pip does and check its contents and imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aa_deploy.common.version import __version__

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"aa_deploy": "aa_deploy", "calibration": "aa_deploy/calibration", "converters": "aa_deploy/converters"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("aa_deploy-*.whl")
    return path


def test_wheel_has_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"aa_deploy", f"aa_deploy-{__version__}.dist-info"}
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["aa_deploy"]


def test_every_module_of_the_checkout_is_in_the_wheel(wheel):
    """A new subpackage missing from pyproject's package list would be dropped from the wheel in silence."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, installed in FOLDERS.items():
        for source in (ROOT / folder).rglob("*.py"):
            relative = source.relative_to(ROOT / folder)
            if folder == "aa_deploy" and relative.parts[0] in ("calibration", "converters"):
                continue
            assert f"{installed}/{relative.as_posix()}" in names, f"{folder}/{relative} is not in the wheel"
    assert "aa_deploy/common/assets/resnet20-12fca82f.th" in names


def test_unpacked_wheel_imports_by_the_one_name(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import importlib.util, aa_deploy.calibration.calibrate as c, aa_deploy.converters.bridge as b;"
        "print(c.__file__); print(b.__file__);"
        "print(importlib.util.find_spec('calibration'), importlib.util.find_spec('converters'))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calibrate_file, bridge_file, specs = out.stdout.splitlines()
    assert Path(calibrate_file) == site / "aa_deploy" / "calibration" / "calibrate.py"
    assert Path(bridge_file) == site / "aa_deploy" / "converters" / "bridge.py"
    assert specs == "None None"
