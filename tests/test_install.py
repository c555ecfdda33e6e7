"""The environment is the lock: what `make install` put in .venv is exactly requirements.lock,
and the lock installs on Linux, macOS and Windows alike."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from packaging.markers import Marker
from packaging.utils import canonicalize_name

from conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?: ; ([^\\]+))?", re.M)


def locked(environment: dict[str, str] | None = None) -> dict[str, str]:
    """Name and version of every pin of requirements.lock whose marker holds in `environment`
    (this interpreter's when None)."""
    pins = PIN.findall((ROOT / "requirements.lock").read_text())
    return {
        canonicalize_name(name): pinned
        for name, pinned, marker in pins
        if not marker or Marker(marker.strip()).evaluate(environment)
    }


MACOS = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"}
WINDOWS = {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"}


def test_the_lock_is_universal_cuda_packages_are_for_linux_only():
    for environment in (MACOS, WINDOWS):
        pins = locked(environment)
        assert {"torch", "torchvision", "lightning", "gradio"} <= set(pins)
        cuda = [name for name in pins if name.startswith(("nvidia-", "cuda-", "triton"))]
        assert cuda == [], environment["sys_platform"]
    assert "nvidia-cudnn-cu13" in locked({"sys_platform": "linux", "platform_machine": "x86_64"})


def test_every_locked_package_is_installed_at_its_locked_version():
    pins = locked()
    assert len(pins) > 50 and {"torch", "lightning", "hydra-core", "onnxruntime"} <= set(pins)
    wrong = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != pinned.split("+")[0]:
            wrong[name] = (pinned, installed)
    assert wrong == {}, "run `make install` (or `make lock` after changing pyproject.toml)"


def test_every_direct_import_of_the_package_is_a_declared_dependency():
    """What src/ imports from outside the standard library is in pyproject.toml."""
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(re.split(r"[<>=\[; ]", d)[0]) for d in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {canonicalize_name(re.split(r"[<>=\[; ]", d)[0]) for d in extra}
    module_to_package = {"PIL": "pillow", "yaml": "pyyaml", "hydra": "hydra-core", "sqlalchemy": "sqlalchemy"}
    imported = set()
    for path in (ROOT / "src" / "mnistlab").glob("*.py"):
        imported |= set(re.findall(r"^\s*(?:from|import) ([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.M))
    third_party = imported - set(sys.stdlib_module_names) - {"mnistlab", "__future__"}
    missing = {m for m in third_party if canonicalize_name(module_to_package.get(m, m)) not in declared}
    assert missing == set()
