"""Train one top-k SAE per decoder layer from a single forward pass of the language model per batch.

Read top to bottom: set-up, the per-layer step (outlier filter, SAE forward, AuxK, decoder-norm
constraint, dead-latent counters), the loop, checkpoints. Distributed runs (torchrun) either split
the data (mode "dp": gradients and counters summed over ranks) or the layers (mode "layers": each
rank trains its share of the SAEs on the same batches).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor
from torch.profiler import record_function
from tqdm.auto import tqdm

from saescope.core.activation_cache import ActivationSource, open_activations
from saescope.core.activations import OutlierFilter
from saescope.core.data import batches, iter_texts
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_bytes, atomic_write_json, read_json
from saescope.core.io import RunDir, save_native
from saescope.core.io.formats import load_native
from saescope.core.io.lock import RunLock
from saescope.core.models import LoadedModel, capture, load_model
from saescope.core.models.builtin import DEFAULT_MODEL
from saescope.core.models.load import DTYPE_NAMES, resolve_device
from saescope.core.sae import SAE, SAE_KINDS, SAEConfig, Workspace, default_lr, make_sae
from saescope.core.sae.cpu_kernels import kernels
from saescope.core.schema import Field, check_record, escape
from saescope.core.train.config import SOFT_FROZEN_COS, TrainConfig, budget_lr, buffer_steps, parse_layers

# The parts of a step, as torch.profiler scopes (bench/throughput.py --profile sums each): where the time goes.
STEP_PARTS = ("lm_forward", "cache_read", "window", "filter", "sae_forward", "backward", "optimizer", "decoder_norm",
              "bookkeeping")


def part(name: str) -> record_function:
    return record_function(f"saescope.{name}")


def _write_error(exc: BaseException, folder: Path) -> str:
    """One line saying why a checkpoint write failed."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:  # torch.save and safetensors do not say that the disk is full
        if shutil.disk_usage(folder).free < 2**20:
            return "no space left on device"
    except OSError:
        pass
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype name; `auto` is bf16 on GPU, and on a CPU bf16 where it multiplies bf16 much faster than fp32 (measured
    once per machine: saescope.core.system.cpu_lm_dtype), for the language model and the SAE's step alike.
    A bf16 SAE step (encoder product, top-k, the gathers of the decoder and of the gradients) keeps fp32 master weights
    and sums in fp32; its FVU at equal tokens equals the fp32 step's (bench/RESULTS.md, "Speed, part 4"). An explicit
    fp32 encoder on such a CPU runs as a bf16 screen with an fp32 ranking (saescope.core.sae.fast.screens)."""
    from saescope.core.models import parse_dtype

    return parse_dtype(name, str(device))


def _window_seed(seed: int, step: int, layer: int) -> int:
    """A 63-bit seed for one layer's shuffle of the window starting at `step` (any data seed fits)."""
    digest = hashlib.sha256(f"saescope-window:{seed}:{step}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class LayerState:
    """One layer's SAE, optimizer and counters. Counters live on the SAE's device so that a step
    needs no host sync; they are read on the host only when logging or checkpointing."""

    sae: SAE
    opt: torch.optim.Optimizer
    since_fired: Tensor  # tokens since each latent last fired
    norm_filter: OutlierFilter  # the L2-norm outlier filter, with its running median
    seen: int = 0  # tokens offered to this layer
    dropped: Tensor | None = None  # tokens removed by the outlier filter
    nonfinite_batches: int = 0
    acc: Tensor | None = None  # running sums since the last log line: fvu, auxk, l0, steps
    init_rows: Tensor | None = None  # a decoder control's initial decoder (frozen at it, or held near it)


class Distributed:
    """Rank and world of a torchrun launch (world 1 without one); sums tensors over ranks."""

    def __init__(self, mode: str | None):
        self.mode = mode
        self.on = mode is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.on and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        if self.on and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def dp(self) -> bool:
        """Several ranks splitting the data: sums over ranks apply."""
        return self.on and self.mode == "dp"

    def sum_(self, t: Tensor) -> Tensor:
        if self.dp:
            dist.all_reduce(t)
        return t

    def gather_cat(self, t: Tensor) -> Tensor:
        """Concatenate equal-sized tensors of all ranks (every rank's batch has the same shape)."""
        if not self.dp:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def fewest(self, n: int, device: torch.device) -> int:
        """The smallest n over the data-parallel ranks (n itself otherwise); `device` is one the backend reduces
        on (NCCL: CUDA only)."""
        if not self.dp:
            return n
        t = torch.tensor(n, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, lm: LoadedModel | None = None, distributed: str | None = None):
        self.cfg = cfg = replace(cfg)  # a copy: the resolved learning rate is written into it, not into the caller's
        self.dist = Distributed(distributed)
        self.device = resolve_device(cfg.device)
        if self.dist.on and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.source: ActivationSource | None = None
        self.lm: LoadedModel | None = None
        if cfg.activations is not None:  # no language model: its activations are on disk
            self.source = self._open_source()
            self.d_model = self.source.d_model
            self.all_layers = self._source_layers()
        else:
            self.lm = lm or load_model(cfg.model, dtype=self._dtype(cfg.model_dtype), device=str(self.device),
                                       device_map=cfg.model_device_map, load_in_8bit=cfg.load_in_8bit)
            if cfg.model_dtype == "auto":  # recorded in train.json: a resume (on any machine) reads what this run read
                cfg.model_dtype = DTYPE_NAMES.get(self.lm.dtype, cfg.model_dtype)
            self.d_model = self.lm.d_model
            self.all_layers = parse_layers(cfg.layers, self.lm.n_layers)
        self.compute_dtype = self._dtype(cfg.sae_dtype)
        if cfg.sae_dtype == "auto":  # recorded resolved, as the LM's: a resume on another machine computes as this run did
            cfg.sae_dtype = DTYPE_NAMES.get(self.compute_dtype, cfg.sae_dtype)
        # Layer sharding: rank r owns every world-th layer; in dp mode every rank owns all.
        shard = self.dist.on and distributed == "layers"
        self.layers = self.all_layers[self.dist.rank :: self.dist.world] if shard else self.all_layers
        self.d_sae, self.k = cfg.width_and_k(self.d_model)
        self.run = RunDir(cfg.out)
        self.out = self.run.path
        self.tokens_per_step = cfg.batch_size * cfg.ctx_len * (self.dist.world if self.dist.dp else 1)
        self.total_steps = max(1, cfg.max_tokens // self.tokens_per_step)
        self.base_lr = cfg.lr or budget_lr(self.d_sae, self.total_steps)
        # The step the kind's own selection starts at (0: top-k, or no warm-up); a checkpoint keeps it, so that a resume
        # asking for more tokens does not move it.
        self.warmup_steps = round(cfg.per_token_warmup * self.total_steps) if SAE_KINDS[cfg.arch].global_selection else 0
        cfg.lr = self.base_lr  # recorded in train.json, so a resumed run keeps it whatever the defaults become
        self.step = 0
        self.checkpoint_error = ""
        self.batches_done = 0
        self.tokens = 0
        self.states: dict[int, LayerState] = {}
        self._init_rows: dict[int, Tensor] | None = None  # the data-driven initial decoders, when asked for again
        torch.manual_seed(cfg.seed)  # the global generator too, so that two fresh runs save the same RNG state
        self.workspace = Workspace()  # one pre-activation buffer for all layers, stepped one after the other
        if self.device.type == "cpu":
            kernels()  # a first build (~15 s) says so before the progress bar starts, not inside it
        for n in self.layers:
            sae = self._new_sae(device=self.device)
            sae.init_tied(self._init_generator(n))
            self.states[n] = self._layer_state(sae)
        if cfg.decoder_init == "data":  # a resumed run overwrites these weights from its checkpoint
            for n, rows in self._data_rows().items():
                with torch.no_grad():
                    self.states[n].sae.W_dec.copy_(rows.to(self.device))
                    # Data rows are far from orthogonal: a token's k nearest rows all point its way, and a tied
                    # encoder would decode it k times over (FVU ~70 at step 0). 1/k keeps the ranking and the scale.
                    self.states[n].sae.W_enc.copy_(rows.to(self.device) / self.k)
        if cfg.decoder != "trained":  # a control: the initial decoder is the reference it stays at (or near)
            for st in self.states.values():
                st.init_rows = st.sae.W_dec.detach().clone()
                st.sae.meta["control"] = {"kind": f"{cfg.decoder}-decoder" if cfg.decoder == "frozen" else cfg.decoder,
                                          "seed": cfg.seed}

    def _new_sae(self, **kw) -> SAE:
        sae = make_sae(SAEConfig(self.d_model, self.d_sae, self.k, kind=self.cfg.arch), **self.cfg.sae_options(), **kw)
        sae.centred = self.cfg.centre_encoder
        return sae

    def _open_source(self) -> ActivationSource:
        """The cached activations of cfg.activations, checked against what the run asks for; cfg then records the
        cache's model and data (what the SAEs are of, and what an evaluation reads)."""
        cfg = self.cfg
        path = Path(cfg.activations)
        layer = None
        if path.is_file():
            asked = parse_layers(cfg.layers, None) if cfg.layers not in (None, "all") else [0]
            if len(asked) != 1:
                raise ParamError(f"{escape(str(path))} holds one layer's activations: give {{}} as one layer number", "layers")
            layer = asked[0]
        source = open_activations(path, layer=layer)
        info = source.info
        if source.model is not None:
            if cfg.model is not None and cfg.model != source.model:
                raise ParamError(f"{escape(str(path))} caches {escape(source.model)}, not {escape(cfg.model)}: leave out {{}} "
                                 "or cache that model", "model")
            cfg.model = source.model
        if info:
            if cfg.skip_first_token and not info["skip_first_token"]:
                raise ParamError(f"{escape(str(path))} kept every sequence's first token; cache with {{}} to leave it out",
                                 "skip_first_token")
            if cfg.data is not None and cfg.data != info["data"]:
                raise ParamError(f"{escape(str(path))} caches data {escape(str(info['data']))}, not {escape(cfg.data)}: "
                                 "leave out {}", "data")
            cfg.data, cfg.text_column, cfg.skip_first_token = info["data"], info["text_column"], info["skip_first_token"]
            cfg.model_dtype = info["model_dtype"]
        if cfg.max_tokens > source.n_tokens:
            warnings.warn(f"{cfg.max_tokens} training tokens from {source.n_tokens} cached: "
                          f"{cfg.max_tokens / source.n_tokens:.1f} passes over the cache", stacklevel=3)
        return source

    def _source_layers(self) -> list[int]:
        have = self.source.layers
        if self.cfg.layers in (None, "all"):
            return have
        asked = parse_layers(self.cfg.layers, None)
        if missing := [n for n in asked if n not in have]:
            raise ParamError(f"{escape(self.source.origin)} holds layers {escape(','.join(map(str, have)))}, not layer "
                             f"{missing[0]}: give {{}} among them or cache that layer", "layers")
        return asked

    def _dtype(self, name: str) -> torch.dtype:
        """The LM's or the SAE step's dtype; `auto` on CPU is a timing, so under torchrun rank 0's choice is every
        rank's (ranks timing the same CPU near the threshold could disagree, and their activations would differ)."""
        dtype = resolve_dtype(name, self.device)
        if self.dist.on and name == "auto":
            on_gpu = dist.get_backend() == "nccl"  # nccl moves CUDA tensors only, even for a run on CPU
            code = torch.tensor([int(dtype == torch.bfloat16)], device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
            dist.broadcast(code, src=0)
            dtype = torch.bfloat16 if int(code) else torch.float32
        return dtype

    def _init_generator(self, n: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 100_003 + n)

    def _random_rows(self, n: int) -> Tensor:
        """Layer n's random initial decoder rows (the tied init of Gao et al.), regenerated from the seed."""
        init = self._new_sae()
        init.init_tied(self._init_generator(n))
        return init.W_dec.detach()

    @torch.no_grad()
    def _data_rows(self) -> dict[int, Tensor]:
        """Per layer, d_sae unit rows: centred activations of distinct training tokens (the outlier filter applied),
        in a seeded order; random rows fill in if the sample is short. The same rows every time they are asked for."""
        from saescope.core.activations import sample_activations

        if self.source is not None:  # the first d_sae tokens of the run's first pass, the outlier filter applied
            index = self.source.positions(self._data_seed(), 0, min(self.d_sae, self.source.n_tokens))
            acts = {}
            for n in self.layers:
                x = self.source.rows(n, index)
                acts[n] = x[OutlierFilter(self.cfg.outlier_factor).keep(x)]
        else:
            acts = sample_activations(self.lm, self.layers, data=self.cfg.data, text_column=self.cfg.text_column,
                                      n_tokens=self.d_sae, ctx_len=self.cfg.ctx_len, outlier_factor=self.cfg.outlier_factor,
                                      split="train", desc="activations for the decoder init")
        rows = {}
        for n, x in acts.items():
            x = x - x.mean(0)
            x = x[torch.randperm(len(x), generator=self._init_generator(n))]
            w = self._random_rows(n).clone()
            w[: len(x)] = x[: self.d_sae] / x[: self.d_sae].norm(dim=1, keepdim=True).clamp_min(1e-12)
            rows[n] = w
        return rows

    @torch.no_grad()
    def decoder_cos_to_init(self, n: int) -> float:
        """Median cosine between layer n's decoder rows and their initial values: near 1 means the features
        are still mostly their initialisation (too little training to compare seeds meaningfully)."""
        if self.cfg.decoder_init == "data":
            if self._init_rows is None:
                self._init_rows = self._data_rows()
            init_rows = self._init_rows[n]
        else:
            init_rows = self._random_rows(n)
        return float((init_rows * self.states[n].sae.W_dec.detach().float().cpu()).sum(1).median())

    def _layer_state(self, sae: SAE) -> LayerState:
        sae.compute_dtype = self.compute_dtype
        sae.meta = {"model": self.cfg.model or DEFAULT_MODEL, "hook": "decoder layer output",
                    "trained_by": "saescope"}
        # Fused Adam: one pass over each tensor instead of a dozen. On GPU it saves launches; on CPU it is 4.7x
        # faster than the foreach default (6.4 vs 29.9 ms per step for a 576 x 9216 SAE, 2 threads), which at
        # 30 layers was a fifth of the step. Devices without a fused kernel keep the default.
        groups = sae.optimizer_groups()
        if self.cfg.decoder == "frozen":  # the frozen-decoder control: W_dec is never stepped
            sae.W_dec.requires_grad_(False)
            groups = [{**g, "params": [p for p in g["params"] if p is not sae.W_dec]} for g in groups]
        try:
            opt = torch.optim.Adam(groups, lr=self.base_lr, fused=self.device.type in ("cuda", "cpu"))
        except (RuntimeError, TypeError):
            opt = torch.optim.Adam(groups, lr=self.base_lr)
        dev = self.device
        return LayerState(sae, opt, since_fired=torch.zeros(self.d_sae, dtype=torch.long, device=dev),
                          norm_filter=OutlierFilter(self.cfg.outlier_factor, dev),
                          dropped=torch.zeros((), dtype=torch.long, device=dev), acc=torch.zeros(4, device=dev))

    # ------------------------------------------------------------------ one step
    def _tokens(self, acts: Tensor) -> Tensor:
        """One layer's captured (batch, seq, d_model) activations as the (tokens, d_model) rows a step trains on."""
        if self.cfg.skip_first_token:
            acts = acts[:, 1:]
        return acts.reshape(-1, acts.shape[-1])

    def _window(self, captured: list[dict[int, Tensor]]) -> Iterator[dict[int, Tensor]]:
        """The steps of one window of captured batches: per step, per layer, the (tokens, d_model) rows to train on.

        A layer's batch holding NaN/inf is left out of that layer's window (warned, counted; in dp mode on every
        rank alike), so the layer sits out a step. With more than one batch, each layer's tokens are shuffled across
        the window (seeded by the run's data seed, the window's first step and the layer, so a resumed run draws the
        same, and a layer draws the same whichever other layers train). The captured batches are emptied."""
        with part("window"):
            pools = self._pools(captured)
        for j in range(len(captured)):
            step: dict[int, Tensor] = {}
            for n, (x, order, size) in pools.items():
                if (j + 1) * size <= len(x):
                    step[n] = x if order is None else x[order[j * size:(j + 1) * size]]
            yield step

    def _pools(self, captured: list[dict[int, Tensor]]) -> dict[int, tuple[Tensor, Tensor | None, int]]:
        """Per layer: the window's finite rows, their draw order (None for a one-batch window) and one step's size."""
        ok = torch.tensor(self._finite(captured), dtype=torch.bool)
        seed = self._data_seed()
        pools: dict[int, tuple[Tensor, Tensor | None, int]] = {}
        for i, n in enumerate(self.layers):
            # popped: the window is held once, as the layers' pools, not also as the captured batches
            rows = [self._tokens(acts.pop(n)) for acts in captured]
            rows = [r for r, good in zip(rows, ok[:, i].tolist()) if good]
            if rows:
                x = torch.cat(rows) if len(rows) > 1 else rows[0]
                order = None
                if len(captured) > 1:  # each layer its own draw: a layer's SAE does not depend on which others train
                    gen = torch.Generator().manual_seed(_window_seed(seed, self.step, n))
                    order = torch.randperm(len(x), generator=gen).to(x.device)
                pools[n] = (x, order, len(rows[0]))
        return pools

    def _train_step(self, xs: dict[int, Tensor]) -> None:
        """All layers on one step's (tokens, d_model) rows; a layer not in xs sits the step out. The only host sync:
        the dead counts of every layer together (they size AuxK's top-k)."""
        layers = [n for n in self.layers if n in xs]
        if not layers:
            return
        dead = torch.stack([(self.states[n].since_fired >= self.cfg.dead_tokens).sum() for n in layers]).tolist()
        for n, n_dead in zip(layers, dead):
            self._train_layer(n, xs[n], n_dead=n_dead)

    def lr_scale(self) -> float:
        """Constant, then linear decay to 0 over the last lr_decay_frac of the steps (a function of the
        step alone, so a resumed run follows the same schedule)."""
        frac = self.cfg.lr_decay_frac
        if frac <= 0:
            return 1.0
        remaining = (self.total_steps - self.step) / (frac * self.total_steps)
        return max(0.0, min(1.0, remaining))

    def _train_layer(self, n: int, x: Tensor, n_dead: int) -> None:
        st, sae = self.states[n], self.states[n].sae
        with part("filter"):
            x = x.to(self.device, torch.float32)
            norms = x.norm(dim=1)
            keep = st.norm_filter.keep(x, gather=self.dist.gather_cat, norms=norms)
            w = keep.float()
            st.seen += x.shape[0] * (self.dist.world if self.dist.dp else 1)
            st.dropped += self.dist.sum_((~keep).sum())
            n_tokens = self.dist.sum_(w.sum())
            s1 = self.dist.sum_(w @ x)  # one pass over x each: no (tokens, d) temporaries
            # FVU's denominator over the global batch, so that summing rank gradients equals one big batch.
            s2 = self.dist.sum_(w @ norms.square())
            variance = (s2 - s1.pow(2).sum() / n_tokens.clamp_min(1)).clamp_min(1e-12)
        if self.step == 0:
            # b_dec from the data: the mean of the first batch's kept tokens (over all ranks); a kind's own start too.
            sae.init_b_dec((s1 / n_tokens.clamp_min(1))[None])
            sae.init_from_batch(x[keep])
        sae.per_token = self.step < self.warmup_steps
        if self.step == self.warmup_steps > 0:
            sae.end_warmup(x[keep])
        if self.dist.dp and self.step in (0, self.warmup_steps):  # every rank holds the same SAE: rank 0's start is everyone's
            for t in _own_tensors(sae):
                dist.broadcast(t, src=0)
        with part("sae_forward"):
            dead = st.since_fired >= self.cfg.dead_tokens if n_dead else None
            out = sae(x, dead, n_dead=n_dead, weights=w, variance=variance, workspace=self.workspace,
                      auxk_share=self.cfg.auxk_share)
            loss = out.fvu + self.cfg.auxk_alpha * out.auxk_fvu
            if out.extra is not None:
                loss = loss + out.extra
        with part("backward"):
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist.dp:
                for p in sae.parameters():
                    if p.grad is not None:  # a frozen decoder has none
                        dist.all_reduce(p.grad)
        with part("optimizer"):
            sae.remove_parallel_decoder_grad()
            for group in st.opt.param_groups:
                group["lr"] = self.base_lr * group.get("lr_scale", 1.0) * self.lr_scale()
            st.opt.step()
        with part("decoder_norm"):
            if self.cfg.decoder != "frozen":  # (a frozen decoder's rows are unit already: renormalising would only round)
                sae.normalize_decoder()
            if self.cfg.decoder == "soft-frozen":
                hold_near(sae.W_dec, st.init_rows, SOFT_FROZEN_COS)
        with part("bookkeeping"), torch.no_grad():
            sae.after_step(out.code, keep)
            if self.dist.dp:  # a running estimate (BatchTopK's threshold) from each rank's batch: their mean, like the gradients
                for t in sae.buffers():
                    dist.all_reduce(t)
                    t.div_(self.dist.world)
            active = (out.code.values > 0) & keep[:, None]
            fired = torch.zeros(self.d_sae, dtype=torch.long, device=x.device)
            fired.index_add_(0, out.code.indices.reshape(-1), active.reshape(-1).long())
            self.dist.sum_(fired)
            st.since_fired += n_tokens.long()
            st.since_fired.masked_fill_(fired > 0, 0)
            l0 = self.dist.sum_(active.sum().float()) / n_tokens.clamp_min(1)
            st.acc += torch.stack([self.dist.sum_(out.fvu.detach().clone()), self.dist.sum_(out.auxk_fvu.detach().clone()),
                                   l0, torch.ones((), device=x.device)])

    # ------------------------------------------------------------------ the loop
    def fit(self, *, stop_after_steps: int | None = None) -> dict:
        """Train to cfg.max_tokens (or for stop_after_steps more steps), holding the run folder's lock throughout
        (saescope.core.io.lock: a second writer of the folder refuses instead of mixing two runs' files)."""
        with self._run_lock():
            return self._fit(stop_after_steps)

    @contextmanager
    def _run_lock(self) -> Iterator[None]:
        """Rank 0 takes the folder's lock and checks that the folder is still as this trainer read it (a fresh run
        into a folder that now holds one, or a resumed run whose folder moved on, is refused); under torchrun every
        rank learns the outcome before any writes."""
        lock, problem = None, None
        if self.dist.rank == 0:
            try:
                lock = RunLock(self.out).__enter__()
                problem = self._changed_since_read()
                if problem is None:  # staging folders of killed writers: nobody else can be writing now
                    for stale in self.run.checkpoints.glob(".staging-*"):
                        shutil.rmtree(stale, ignore_errors=True)
            except SaescopeError as exc:
                problem = exc
        ok = torch.tensor(int(problem is None), device=self.device if self.dist.on else "cpu")
        if self.dist.on:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        try:
            if not ok.item():
                raise problem or SaescopeError(f"{self.out}: rank 0 could not take the run folder's lock")
            yield
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    def _changed_since_read(self) -> SaescopeError | None:
        latest = self.run.latest_name()
        if self.step == 0 and self.run.has_run():
            return ParamError(f"{escape(str(self.out))} already holds a run (written since this trainer started); give {{}} "
                              "to continue it or choose another {}", "resume", "out")
        if self.step > 0 and latest != self._checkpoint_name():
            return SaescopeError(f"{self.out}: the run moved on since it was read (its latest checkpoint is {latest}, this "
                                 f"trainer resumed step {self.step}); resume again")
        return None

    def _fit(self, stop_after_steps: int | None) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0 and self.step == 0:  # a fresh start (or a restart before the first checkpoint)
            self.run.train_log.unlink(missing_ok=True)
        tokens_per_step, total_steps = self.tokens_per_step, self.total_steps
        bar = tqdm(total=total_steps * tokens_per_step, initial=self.tokens, unit="tok", unit_scale=True,
                   desc=f"train {len(self.layers)} layers", disable=self.dist.rank != 0, dynamic_ncols=True)
        log = open(self.run.train_log, "a") if self.dist.rank == 0 else None
        started, steps_run = time.perf_counter(), 0
        last_log_t, last_log_tokens = started, self.tokens
        steps = self._lm_steps(stop_after_steps) if self.source is None else self._cached_steps(stop_after_steps)
        try:
            for xs in steps:
                self._train_step(xs)
                self.step += 1
                steps_run += 1
                self.tokens += tokens_per_step
                bar.update(tokens_per_step)
                if self.step % cfg.log_every == 0 or self.step == total_steps:
                    now = time.perf_counter()
                    rec = self._log_record((self.tokens - last_log_tokens) / max(now - last_log_t, 1e-9), now - started)
                    last_log_t, last_log_tokens = now, self.tokens
                    if log:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    mean_fvu = sum(v["fvu"] for v in rec["layers"].values()) / max(len(rec["layers"]), 1)
                    bar.set_postfix(fvu=f"{mean_fvu:.3f}", step=self.step)
                # A window of LM batches ends at a checkpoint (see _lm_steps), so this is always between windows.
                if self.step % cfg.checkpoint_every == 0 and self.step < total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log:
                log.close()
        if self.step == 0:
            raise ParamError("the dataset is too small for one batch: lower {}/{} or add data", "ctx_len", "batch_size")
        if self._latest() != self._checkpoint_name() and self.save_checkpoint() is None:
            latest = self._latest()
            raise ParamError(escape(f"the final checkpoint (step {self.step}) could not be written to {self.out} "
                                    f"({self.checkpoint_error}); ") + (escape(f"the latest valid one is {latest}") + ": free space "
                                                                       "and rerun with {} to finish from it" if latest else
                                                                       "no checkpoint was kept"), *(["resume"] if latest else []))
        elapsed = time.perf_counter() - started
        summary = {"steps": self.step, "tokens": self.tokens, "elapsed_s": elapsed,
                   "model_dtype": str(self.lm.dtype).removeprefix("torch.") if self.lm else self.cfg.model_dtype,
                   "tokens_per_s": steps_run * tokens_per_step / max(elapsed, 1e-9),
                   "layers": {n: {"dropped": int(st.dropped), "seen": int(st.seen), "nonfinite_batches": st.nonfinite_batches,
                                  "decoder_cos_to_init": self.decoder_cos_to_init(n)}
                              for n, st in self.states.items()}}
        if self.dist.rank == 0:
            atomic_write_json(self.run.train_summary, summary)
        return summary

    def _data_seed(self) -> int:
        return self.cfg.seed if self.cfg.data_seed is None else self.cfg.data_seed

    def _lm_steps(self, stop_after_steps: int | None) -> Iterator[dict[int, Tensor]]:
        """Each step's rows from the language model: the LM runs a window of batches, whose tokens the steps then draw
        from (see _window)."""
        cfg = self.cfg
        stream = batches(iter_texts(cfg.data, text_column=cfg.text_column), self.lm.tokenizer, ctx_len=cfg.ctx_len,
                         batch_size=cfg.batch_size, seed=self._data_seed(), shuffle_buffer=cfg.shuffle_buffer,
                         skip=self.batches_done)
        window = buffer_steps(cfg.activation_buffer, cfg.batch_size * cfg.ctx_len)
        data = iter(stream)
        steps_run = 0
        while self.step < self.total_steps and (stop_after_steps is None or steps_run < stop_after_steps):
            # A window ends at the next checkpoint, so a run resumed from one draws the windows it would have
            # (stop_after_steps and a resume with another --checkpoint-every move the windows: same data, other draws).
            size = min(window, self.total_steps - self.step, cfg.checkpoint_every - self.step % cfg.checkpoint_every)
            if stop_after_steps is not None:
                size = min(size, stop_after_steps - steps_run)
            captured = []
            while len(captured) < size:
                batch = next(data, None)
                if batch is None:
                    break
                self.batches_done += 1
                if self.dist.dp and (self.batches_done - 1) % self.dist.world != self.dist.rank:
                    continue
                with part("lm_forward"):
                    captured.append(capture(self.lm.model, batch.to(self.lm.device), self.layers))
            # Where the data ends, a rank may hold one batch more than another: every step's reductions need all
            # ranks, so each trains on as many batches as the rank with fewest (one without any ends them all).
            captured = captured[: self.dist.fewest(len(captured), self.device)]
            if not captured:
                return
            for xs in self._window(captured):
                steps_run += 1
                yield xs

    def _cached_steps(self, stop_after_steps: int | None) -> Iterator[dict[int, Tensor]]:
        """Each step's rows from the activation cache: step s reads stream positions [s T, (s + 1) T) of the source's
        seeded passes (saescope.core.activation_cache), in dp mode each rank its own part of them."""
        per_rank = self.cfg.batch_size * self.cfg.ctx_len
        steps_run = 0
        while self.step < self.total_steps and (stop_after_steps is None or steps_run < stop_after_steps):
            start = self.step * self.tokens_per_step + (self.dist.rank * per_rank if self.dist.dp else 0)
            index = self.source.positions(self._data_seed(), start, per_rank)
            with part("cache_read"):
                xs = {n: self.source.rows(n, index) for n in self.layers}
                ok = self._finite([xs])[0]
            self.batches_done += self.dist.world if self.dist.dp else 1
            steps_run += 1
            yield {n: x for i, (n, x) in enumerate(xs.items()) if ok[i]}

    def _finite(self, captured: list[dict[int, Tensor]]) -> list[list[bool]]:
        """Per captured batch, per layer, whether its activations are finite (in dp mode: on every rank); a layer's
        batch that is not is warned about and counted, and the layer sits it out."""
        # A NaN or inf anywhere makes the sum non-finite: one vectorised pass per layer in the activations' own dtype
        # (30 layers x 4,096 bf16 tokens on 2 cores: 6 ms, where isfinite().all() took 99 ms, 3% of a step). Only a sum
        # that overflows without either asks the exact test.
        sums = torch.stack([acts[n].sum().float().to(self.device) for acts in captured for n in self.layers])
        finite = torch.isfinite(sums)
        if not bool(finite.all()):
            finite = torch.stack([torch.isfinite(acts[n]).all().to(self.device) for acts in captured for n in self.layers])
        finite = finite.long()
        if self.dist.dp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        ok = torch.tensor(finite.tolist()).reshape(len(captured), len(self.layers)).bool()
        for i, n in enumerate(self.layers):
            st = self.states[n]
            for _ in range(int((~ok[:, i]).sum())):
                st.nonfinite_batches += 1
                warnings.warn(f"layer {n}: NaN/inf activations, batch skipped ({st.nonfinite_batches} so far)", stacklevel=4)
        return ok.tolist()

    def _log_record(self, tok_per_s: float, elapsed: float) -> dict:
        layers = {}
        for n, st in self.states.items():
            fvu, auxk, l0, steps = (st.acc / st.acc[3].clamp_min(1)).tolist()
            if not math.isfinite(fvu):
                latest = self._latest()
                raise ParamError(f"training diverged at step {self.step}: layer {n}'s FVU is {fvu} (lower {{}}); "
                                 + escape(f"{latest} is the last checkpoint" if latest else "no checkpoint was written"), "lr")
            layers[n] = {"fvu": fvu, "auxk": auxk, "l0": l0,
                         "dead_frac": float((st.since_fired >= self.cfg.dead_tokens).float().mean()),
                         "dropped_frac": int(st.dropped) / max(int(st.seen), 1)}
            st.acc.zero_()
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": round(elapsed, 2),
                "tok_per_s": round(tok_per_s, 1), "layers": layers}

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_name(self) -> str:
        return self.run.checkpoint_name(self.step)

    def _latest(self) -> str | None:
        """The checkpoint that `latest` points at, relative to the run folder."""
        return self.run.latest_name()

    def save_checkpoint(self) -> Path | None:
        """Write every SAE and the training state to a new folder, then point `latest` at it.

        The previous checkpoint stays valid until the pointer moves; a failed write (full disk)
        leaves it untouched and is reported, and training goes on.
        """
        name = self._checkpoint_name()
        folder = self.out / name
        staging = self.run.staging(self.step, self.dist.rank)
        # on the training device: NCCL reduces CUDA tensors only
        ok = torch.tensor(1, device=self.device if self.dist.on else "cpu")
        self.checkpoint_error = ""
        # In dp mode every rank holds the same SAEs and state: rank 0 writes them for all.
        writer = not (self.dist.dp and self.dist.rank > 0)
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for n, st in (self.states.items() if writer else ()):
                if not all(torch.isfinite(p).all() for p in st.sae.parameters()):
                    raise ParamError(f"training diverged before step {self.step}: layer {n}'s SAE holds NaN or inf "
                                     f"(lower {{}}); {escape(self._latest() or 'no checkpoint')} stays the latest", "lr")
                st.sae.meta.update({"layer": n, "tokens": self.tokens, "step": self.step})
                save_native(st.sae, staging, n)
            state = {"step": self.step, "batches_done": self.batches_done, "tokens": self.tokens,
                     "warmup_steps": self.warmup_steps,
                     "rng": torch.get_rng_state(),
                     "layers": {n: {"opt": st.opt.state_dict(), "since_fired": st.since_fired.cpu(),
                                    "medians": st.norm_filter.medians.cpu(), "n_medians": st.norm_filter.count, "seen": int(st.seen),
                                    "dropped": int(st.dropped), "nonfinite": st.nonfinite_batches,
                                    "own": _own_state(st.sae)}
                                for n, st in self.states.items()}}
            if writer:
                torch.save(state, staging / f"state-rank{self.dist.rank}.pt")
        except (OSError, RuntimeError, SafetensorError) as exc:
            # torch.save reports a full disk as a RuntimeError ("unexpected pos ..."), safetensors as its own error
            ok.fill_(0)
            self.checkpoint_error = _write_error(exc, self.out)
            warnings.warn(f"checkpoint at step {self.step} not written ({self.checkpoint_error}); the previous one stays valid",
                          stacklevel=2)
        if self.dist.on:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            shutil.rmtree(staging, ignore_errors=True)  # every rank: the files of a rank whose own write succeeded too
            self.checkpoint_error = self.checkpoint_error or "another rank could not write its part"
            return None
        folder.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, folder / f.name)
        staging.rmdir()
        self.dist.barrier()
        if self.dist.rank == 0:
            # The config is written with the checkpoint it describes, so that a run refused or killed before its
            # first checkpoint leaves no train.json, and a refused resume never rewrites it.
            atomic_write_json(self.run.train_config, self.cfg.to_dict())
            atomic_write_bytes(self.run.pointer, (name + "\n").encode())
            for old in sorted(self.run.checkpoints.glob("step-*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return folder

    def load_checkpoint(self) -> bool:
        """Restore the latest checkpoint of this run folder, if any. Returns whether one was found."""
        folder = self.run.latest()
        if folder is None:
            return False
        path = folder / f"state-rank{0 if self.dist.dp else self.dist.rank}.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise SaescopeError(f"cannot resume from {path}: the file is missing") from exc
        except Exception as exc:
            raise SaescopeError(f"cannot resume from {path}: corrupt or truncated ({type(exc).__name__})") from exc
        _check_state(state, path, folder.name)
        saved = read_json(self.run.train_config) if self.run.train_config.is_file() else {}
        if isinstance(saved, dict) and "lr" in saved and saved["lr"] is None:
            # Runs saved before the budget rule recorded no lr: they trained at Gao et al.'s rate, so go on at it.
            self.base_lr = self.cfg.lr = default_lr(self.d_sae)
        if state["tokens"] != state["step"] * self.tokens_per_step:
            raise SaescopeError(f"{path}: {state['tokens']} tokens in {state['step']} steps does not match the run's "
                                f"{self.tokens_per_step} tokens per step (train.json's batch_size and ctx_len)")
        if not state["step"] <= state["batches_done"] <= state["step"] * self.dist.world:
            raise SaescopeError(f"{path}: batches_done {state['batches_done']} does not fit step {state['step']}")
        if state["step"] > self.total_steps:
            raise ParamError(f"cannot resume: the run has trained {state['tokens']} tokens, more than {{}} "
                             f"{self.cfg.max_tokens}: give a larger {{}} to go on", "max_tokens", "max_tokens")
        if set(state["layers"]) != set(self.states):
            raise SaescopeError(f"cannot resume: checkpoint has layers {sorted(state['layers'])}, run has {self.layers}")
        for n, st in self.states.items():
            sae = load_native(folder, n).to(self.device)
            if sae.cfg != st.sae.cfg:
                raise SaescopeError(f"cannot resume: layer {n} SAE is {sae.cfg}, the run asks for {st.sae.cfg}")
            s = state["layers"][n]
            if s["since_fired"].shape != st.since_fired.shape or s["medians"].shape != st.norm_filter.medians.shape:
                raise SaescopeError(f"{path}: layer {n}'s counters do not match its SAE (d_sae {self.d_sae})")
            own = s.get("own", {})
            if set(own) != set(_own_state(st.sae)):
                raise SaescopeError(f"{path}: layer {n}'s {st.sae.cfg.kind} state holds {sorted(own)}, expected "
                                    f"{sorted(_own_state(st.sae))}")
            with torch.no_grad():
                for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                    getattr(st.sae, name).copy_(getattr(sae, name))
                for name, value in own.items():  # exact: a threshold as trained, not as its file rounds it
                    getattr(st.sae, "b_enc" if name == "centred_b_enc" else name).copy_(value)
            try:
                st.opt.load_state_dict(s["opt"])
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise SaescopeError(f"{path}: layer {n}'s optimizer state does not fit its SAE ({type(exc).__name__})") from exc
            st.since_fired = s["since_fired"].to(self.device, torch.long)
            st.norm_filter.medians, st.norm_filter.count = s["medians"].to(self.device, torch.float32), s["n_medians"]
            st.seen = s["seen"]
            st.dropped.fill_(s["dropped"])
            st.nonfinite_batches = s["nonfinite"]
        self.step, self.batches_done, self.tokens = state["step"], state["batches_done"], state["tokens"]
        self.warmup_steps = state.get("warmup_steps", 0)  # checkpoints from before the warm-up: none
        torch.set_rng_state(state["rng"])
        return True


@torch.no_grad()
def hold_near(W: Tensor, init: Tensor, min_cos: float) -> None:
    """Rows of W (unit norm) whose cosine to their row of `init` (unit norm) fell below min_cos are moved back to exactly
    min_cos, in the plane of the two: the soft-frozen decoder of Korznikov et al."""
    cos = (W * init).sum(1)
    low = cos < min_cos
    if not bool(low.any()):
        return
    away = W[low] - cos[low, None] * init[low]
    away = away / away.norm(dim=1, keepdim=True).clamp_min(1e-12)
    W[low] = min_cos * init[low] + (1 - min_cos**2) ** 0.5 * away


def _own_tensors(sae: SAE) -> list[Tensor]:
    """A kind's own parameters and buffers, sharing storage (written in place by a broadcast)."""
    return [t.detach() for name, t in sae.state_dict(keep_vars=True).items() if name not in ("W_enc", "b_enc", "W_dec", "b_dec")]


def _own_state(sae: SAE) -> dict[str, Tensor]:
    """A kind's parameters and buffers beside the four weights (a log-threshold, a running threshold, a bandwidth), as
    trained, and a centred SAE's b_enc before its fold (the file holds it folded): the checkpoint keeps them exactly, for
    a resume that goes on bit for bit."""
    own = {name: t.detach().cpu().clone() for name, t in sae.state_dict().items() if name not in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.centred:
        own["centred_b_enc"] = sae.b_enc.detach().cpu().clone()
    return own


_STATE = {"step": Field(int, min=0), "batches_done": Field(int, min=0), "tokens": Field(int, min=0),
          "rng": Field(Tensor), "layers": Field(dict), "warmup_steps": Field(int, min=0, required=False)}
_LAYER_STATE = {"opt": Field(dict), "since_fired": Field(Tensor), "medians": Field(Tensor), "n_medians": Field(int, min=0),
                "seen": Field(int, min=0), "dropped": Field(int, min=0), "nonfinite": Field(int, min=0),
                "own": Field(dict, required=False)}


def _check_state(state: object, path: Path, checkpoint: str) -> None:
    """A training state file that loads but lacks keys, holds wrong types or values no run produces is refused
    before anything is restored."""
    check_record(state, _STATE, str(path))
    if checkpoint != f"step-{state['step']:08d}":
        raise SaescopeError(f"{path}: field 'step' is {state['step']}, but the checkpoint is {checkpoint}")
    if state["rng"].dtype != torch.uint8:
        raise SaescopeError(f"{path}: field 'rng' is not a torch RNG state")
    for n, layer in state["layers"].items():
        if not isinstance(n, int):
            raise SaescopeError(f"{path}: layer key {n!r} is not a layer number")
        where = f"{path}: layer {n}"
        check_record(layer, _LAYER_STATE, where)
        if layer["since_fired"].dtype != torch.long or (layer["since_fired"] < 0).any():
            raise SaescopeError(f"{where}: field 'since_fired' must hold non-negative token counts")
        if not (torch.isfinite(layer["medians"]).all() and (layer["medians"] >= 0).all()):
            raise SaescopeError(f"{where}: field 'medians' must hold finite non-negative norms")
        if layer["n_medians"] > state["step"] or layer["dropped"] > layer["seen"]:
            raise SaescopeError(f"{where}: n_medians {layer['n_medians']} / dropped {layer['dropped']} do not fit step "
                                f"{state['step']} / {layer['seen']} tokens seen")
