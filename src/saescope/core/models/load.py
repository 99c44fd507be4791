"""Load a causal LM and its tokenizer from a built-in name, a local folder, a .gguf file or a hub id."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from saescope.core.errors import SaescopeError
from saescope.core.hub import hub_reachable
from saescope.core.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_dir

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SaescopeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise SaescopeError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SaescopeError(f"device {name!r} asked for, but CUDA is not available here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SaescopeError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def parse_dtype(name: str | torch.dtype, device: str | None = None) -> torch.dtype:
    """A dtype or its name. `auto` is a language model's fast dtype where it runs: bf16 on GPU, and on CPU bf16 only
    where this CPU multiplies bf16 measurably faster than fp32 (saescope.core.system.cpu_lm_dtype), else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
            return torch.bfloat16
        from saescope.core.system import cpu_lm_dtype

        return cpu_lm_dtype()
    if name not in _DTYPES:
        raise SaescopeError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))} or auto")
    return _DTYPES[name]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for, recorded in SAE configs

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks whose outputs are the hook points (`layer{n}` = output of block n)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_hidden_layers", None)
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                 "base_model.model.model.layers"):  # the last: a peft (LoRA) wrapper
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and (n is None or len(m) == n)]
    if not lists:
        raise SaescopeError(f"cannot find the decoder layers of {type(model).__name__}")
    return lists[0]


def load_model(
    spec: str | None = None,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | None = None,
    device_map: str | None = None,
    load_in_8bit: bool = False,
) -> LoadedModel:
    """Load MODEL: a built-in name (default SmolLM2-135M-Instruct), a folder, a .gguf file, or a hub id.

    `device_map="auto"` shards a model too large for one device over the visible devices (accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or DEFAULT_MODEL
    torch_dtype = parse_dtype(dtype, device)
    kwargs: dict = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    tok_kwargs: dict = {}
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        source = str(builtin_model_dir(spec))
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SaescopeError(f"GGUF file not found: {path}")
        source = str(path.parent)
        kwargs["gguf_file"] = tok_kwargs["gguf_file"] = path.name
    elif path.exists():
        if not (path / "config.json").exists():
            raise SaescopeError(f"{path} is not a model folder (no config.json)")
        from saescope.core.files import read_json
        from saescope.core.schema import check_record

        check_record(read_json(path / "config.json"), {}, str(path / "config.json"))  # an object, before transformers reads it
        source = str(path)
    elif spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise SaescopeError(f"model not found: {spec} (neither a built-in name, a folder, a .gguf file nor a hub id)")
    else:
        source = spec
        if not hub_reachable():  # only the local cache can serve it: asking the hub would retry for most of a minute
            kwargs["local_files_only"] = tok_kwargs["local_files_only"] = True
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stderr(quiet) if os.environ.get("SAESCOPE_VERBOSE") is None else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers parsing a user's files raises many types; each is a bad model, not a bug here
        if kwargs.get("local_files_only"):
            raise SaescopeError(f"cannot load model {spec!r}: not in the local Hugging Face cache, and the hub cannot be "
                                "reached from here") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SaescopeError(f"cannot load model {spec!r}: {first[:300]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    if device and not device_map:
        model.to(device)
    return LoadedModel(model, tokenizer, spec)


def unembedding(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Module, float | None]:
    """The logit lens's parts: the model's final norm (applied as the model applies it: RMSNorm, Gemma's
    1 + weight...; identity when it has none), its output embedding, and its final logit soft-capping (or None)."""
    cfg = getattr(model, "config", None)
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None) or getattr(base, "ln_f", None)
    head = model.get_output_embeddings()
    if head is None:
        raise SaescopeError(f"{type(model).__name__} has no output embedding to read logits through")
    softcap = getattr(getattr(cfg, "text_config", None) or cfg, "final_logit_softcapping", None)
    return (norm if norm is not None else (lambda h: h)), head, softcap


def unembed(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of residual-stream vectors x (..., d_model) through the model's final norm and unembedding: the
    logit lens."""
    norm, head, softcap = unembedding(model)
    logits = head(norm(x.to(head.weight.dtype)))
    return logits if not softcap else softcap * (logits / softcap).tanh()


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (' the', not 'Ġthe'); a piece of a multi-byte character shows as �."""
    return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
