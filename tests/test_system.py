"""The CPU dtype choice: `auto` puts the LM in bf16 only where this machine's bf16 matmuls are measured faster."""

import json

import pytest
import torch

import saescope.core.system as system
from saescope.core.errors import SaescopeError
from saescope.core.train import resolve_dtype


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    monkeypatch.delenv("SAESCOPE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(system, "_SPEEDUP", {})
    return tmp_path


def test_the_speedup_is_measured_once_and_cached(fresh, monkeypatch):
    first = system.cpu_bf16_speedup()
    assert first > 0
    files = list((fresh / "kernels").glob("bf16-speed-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["speedup"] == pytest.approx(first)
    # a second process reads the file instead of timing again
    monkeypatch.setattr(system, "_SPEEDUP", {})
    monkeypatch.setattr(system, "_time_matmuls", lambda *a, **k: pytest.fail("timed again"))
    assert system.cpu_bf16_speedup() == pytest.approx(first)


@pytest.mark.parametrize("speedup,want", [(6.7, torch.bfloat16), (1.5, torch.bfloat16), (1.2, torch.float32),
                                          (0.25, torch.float32)])
def test_auto_follows_the_measured_speedup_for_the_lm_and_the_sae_step(fresh, monkeypatch, speedup, want):
    monkeypatch.setattr(system, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == want
    assert resolve_dtype("fp32", cpu) == torch.float32  # a named dtype is never second-guessed
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16  # every GPU: nothing measured


def test_a_reading_commands_auto_is_trainings_auto(fresh, monkeypatch):
    from saescope.core.models import parse_dtype

    monkeypatch.setattr(system, "cpu_bf16_speedup", lambda: 2.3)
    assert parse_dtype("auto", "cpu") == resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert parse_dtype("auto", "cuda:0") == torch.bfloat16  # every GPU: bf16, nothing measured
    monkeypatch.setattr(system, "cpu_bf16_speedup", lambda: 1.1)
    assert parse_dtype("auto", "cpu") == torch.float32
    with pytest.raises(SaescopeError, match="unknown dtype 'int4'; use one of .* or auto"):
        parse_dtype("int4")


def test_the_environment_decides_when_set(fresh, monkeypatch):
    monkeypatch.setattr(system, "cpu_bf16_speedup", lambda: pytest.fail("measured although forced"))
    monkeypatch.setenv("SAESCOPE_CPU_DTYPE", "bf16")
    assert system.cpu_lm_dtype() == torch.bfloat16
    monkeypatch.setenv("SAESCOPE_CPU_DTYPE", "FP32")
    assert system.cpu_lm_dtype() == torch.float32
    monkeypatch.setenv("SAESCOPE_CPU_DTYPE", "int8")
    with pytest.raises(SaescopeError, match="SAESCOPE_CPU_DTYPE must be fp32 or bf16, got 'int8'"):
        system.cpu_lm_dtype()


def test_a_corrupt_cache_file_is_measured_again(fresh):
    key = system._cpu_key()
    path = fresh / "kernels" / f"bf16-speed-{key}.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert system.cpu_bf16_speedup() > 0
    assert json.loads(path.read_text())["speedup"] > 0


def test_the_allocator_setting_is_the_clis_entry_only_and_can_be_turned_off(monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("SAESCOPE_MALLOC", "default")
    assert system.keep_freed_memory() is False
    # in a child process (the setting lasts for the process): glibc accepts both settings, and torch still allocates
    code = ("import saescope.core.system as s; ok = s.keep_freed_memory(); "
            "import torch; a = torch.ones(64 << 20, dtype=torch.uint8); print(ok and int(a.sum()) == 64 << 20)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "SAESCOPE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    import platform

    assert out == str(platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
