"""Memory and time plan for training SAEs on every layer of a model, before renting the GPUs.

Memory is counted exactly from the model's config (parameters counted on the meta device) and the
SAE shapes: fp32 master weights, their gradients and Adam's two moments = 16 bytes per SAE
parameter, plus the LM weights, the captured activations of one step (of the shuffled window when steps are
smaller than the activation buffer) and one layer's dense pre-activations (the only tokens x d_sae tensor the
trainer builds). Time comes from a matmul of
the SAE's encoder shape timed on this machine (its achieved FLOP rate also prices the LM forward at
2 FLOPs per active parameter per token), or from a FLOP rate given with --tflops for another machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from saescope.core.errors import SaescopeError
from saescope.core.files import atomic_write_json
from saescope.core.schema import REQUIRED, Config, config_field
from saescope.core.train.config import ACTIVATION_BUFFER, PRESETS, buffer_steps

# Configs of the Qwen-Scope backbones, so a plan needs no hub access (values from their config.json).
KNOWN_CONFIGS = {
    "Qwen/Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          tie_word_embeddings=False),
    "Qwen/Qwen3-1.7B": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            tie_word_embeddings=True),
    "Qwen/Qwen3-30B-A3B": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                               moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                               num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False),
}
for _base in list(KNOWN_CONFIGS):
    KNOWN_CONFIGS[_base + "-Base"] = KNOWN_CONFIGS[_base]


@dataclass
class Plan:
    model: str
    n_layers: int
    d_model: int
    d_sae: int
    k: int
    gpus: int
    mode: str
    lm_params_b: float
    lm_active_params_b: float
    sae_params_per_layer_m: float
    lm_weights_gb_per_gpu: float
    sae_state_gb_per_gpu: float
    activations_gb_per_gpu: float
    total_gb_per_gpu: float
    tflops_used: float
    tokens_per_s: float
    hours_per_billion_tokens: float


def _config(model: str):
    from transformers import AutoConfig

    if model in KNOWN_CONFIGS:
        d = dict(KNOWN_CONFIGS[model])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    try:
        from saescope.core.models.builtin import BUILTIN_MODELS, builtin_model_dir

        return AutoConfig.from_pretrained(str(builtin_model_dir(model)) if model in BUILTIN_MODELS else model)
    except Exception as exc:  # transformers reading a user's config raises many types; each means a bad config
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SaescopeError(f"cannot read the config of {model!r}: {why} (known offline: {', '.join(KNOWN_CONFIGS)})") from exc


def _param_counts(cfg) -> tuple[int, int]:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    n_exp, top = getattr(cfg, "num_experts", None), getattr(cfg, "num_experts_per_tok", None)
    if n_exp and top:
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or ".experts" in n.rsplit(".", 1)[0])
        return total, total - expert + expert * top // n_exp
    return total, total


def measured_tflops(d_model: int, d_sae: int, device: torch.device, dtype: torch.dtype, tokens: int = 4096) -> float:
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    w = torch.randn(d_sae, d_model, device=device, dtype=dtype)
    for _ in range(2):
        x @ w.T
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, reps = time.perf_counter(), 5
    for _ in range(reps):
        x @ w.T
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * tokens * d_model * d_sae * reps / (time.perf_counter() - t) / 1e12


def make_plan(model: str, *, expansion: int, k: int, gpus: int = 1, mode: str = "layers", tokens_per_step: int = 16384,
              tflops: float | None = None, lm_bytes: int = 2, activation_buffer: int = ACTIVATION_BUFFER) -> Plan:
    if mode not in ("layers", "dp"):
        raise SaescopeError(f"mode must be layers or dp, got {mode!r}")
    cfg = _config(model)
    cfg = getattr(cfg, "text_config", None) or cfg
    d_model, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    d_sae = expansion * d_model
    total, active = _param_counts(cfg)
    sae_params = 2 * d_sae * d_model + d_sae + d_model
    layers_per_gpu = -(-n_layers // gpus) if mode == "layers" else n_layers
    step_tokens = tokens_per_step if mode == "layers" else tokens_per_step // gpus
    sae_gb = layers_per_gpu * sae_params * 16 / 1e9
    held = buffer_steps(activation_buffer, step_tokens) * step_tokens  # a step's tokens, or the shuffled window's
    acts_gb = (held * layers_per_gpu * d_model * 4 + step_tokens * d_sae * 2 * 2) / 1e9
    lm_gb = total * lm_bytes / 1e9
    if tflops is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tflops = measured_tflops(min(d_model, 4096), min(d_sae, 65536), device, dtype)
    flops_per_token = 2 * active + n_layers * 2 * d_model * d_sae * (1 if mode == "dp" else 1 / gpus)
    # Throughput counts the LM forward on every GPU in layers mode (all ranks see the same tokens).
    per_gpu = tflops * 1e12 / flops_per_token
    tokens_per_s = per_gpu * (gpus if mode == "dp" else 1)
    return Plan(model, n_layers, d_model, d_sae, k, gpus, mode, total / 1e9, active / 1e9, sae_params / 1e6, lm_gb, sae_gb,
                acts_gb, lm_gb + sae_gb + acts_gb, tflops, tokens_per_s, 1e9 / tokens_per_s / 3600)


def format_plan(p: Plan, gpu_gb: float = 80.0) -> str:
    fits = "fits" if p.total_gb_per_gpu <= 0.9 * gpu_gb else (
        f"does NOT fit {gpu_gb:.0f} GB: more GPUs, or shard the LM itself (--model-device-map auto) and keep its weights off the SAE GPUs")
    return "\n".join([
        f"{p.model}: {p.n_layers} layers, d_model {p.d_model}; SAE d_sae {p.d_sae}, k {p.k}; {p.gpus} GPU(s), mode {p.mode}",
        f"  LM parameters {p.lm_params_b:.2f}B ({p.lm_active_params_b:.2f}B active per token)",
        f"  per GPU: LM weights {p.lm_weights_gb_per_gpu:.1f} GB + SAE state {p.sae_state_gb_per_gpu:.1f} GB "
        f"({p.sae_params_per_layer_m:.0f}M params/layer x 16 B) + activations {p.activations_gb_per_gpu:.1f} GB "
        f"= {p.total_gb_per_gpu:.1f} GB per GPU: {fits}",
        f"  at {p.tflops_used:.3g} TFLOP/s per GPU: ~{p.tokens_per_s:,.0f} tokens/s, {p.hours_per_billion_tokens:.1f} h per 1B tokens "
        "(FLOP bound; launch and sync overheads come on top)",
    ])


def plan_dict(p: Plan) -> dict:
    return asdict(p)


@dataclass(kw_only=True)
class PlanConfig(Config):
    """`saescope plan`: memory and time of training all layers of MODEL on 1..N GPUs."""

    model: str = config_field(REQUIRED, "hub id (Qwen3-8B, Qwen3-1.7B, Qwen3-30B-A3B known offline), folder or built-in")
    preset: str = config_field("16x-k50", "width multiple and k", choices=tuple(sorted(PRESETS)))
    expansion: int | None = config_field(None, "d_sae / d_model, overriding the preset's", min=1)
    k: int | None = config_field(None, "latents kept per token, overriding the preset's", min=1)
    gpus: list[int] = config_field([1, 8], "GPU counts to plan for, e.g. 1,8", min=1)
    mode: str = config_field("layers", "split the layers over the GPUs, or the data (dp)", choices=("layers", "dp"))
    tokens_per_step: int = config_field(16384, "tokens per optimiser step", min=1)
    tflops: float | None = config_field(None, "achieved TFLOP/s per GPU (default: measured here with an encoder-shaped "
                                        "matmul)", min=0, min_open=True)
    json: str | None = config_field(None, "the plans as JSON", output="file")


@dataclass
class PlanResult:
    plans: list[Plan]

    def text(self) -> str:
        return "\n".join(format_plan(p) for p in self.plans)


def run_plan(cfg: PlanConfig) -> PlanResult:
    expansion, k = PRESETS[cfg.preset]
    plans = [make_plan(cfg.model, expansion=cfg.expansion or expansion, k=cfg.k or k, gpus=g, mode=cfg.mode,
                       tokens_per_step=cfg.tokens_per_step, tflops=cfg.tflops) for g in cfg.gpus]
    if cfg.json:
        atomic_write_json(Path(cfg.json), [plan_dict(p) for p in plans])
    return PlanResult(plans)
