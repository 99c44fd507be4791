"""The Python API the applications build on: a language model with its SAEs behind one object.

    scope = Scope.load("runs/x")                     # model taken from the SAEs' config
    codes = scope.encode(["some text", ...])         # per text, per layer: (tokens, k) indices/values
    pooled = scope.pooled(texts, layer=12, pool="max")  # (n_texts, d_sae)
    pre = scope.pre_activations(ids, layer=12, latents=[3, 7])  # differentiable into the model
    direction = scope.direction(layer=12, feature=3)  # unit decoder row, for steering
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saescope.core.errors import ParamError, SaescopeError
from saescope.core.io import K_HELP, load_saes
from saescope.core.models import LoadedModel, capture, layer_hooks, load_model, token_strings
from saescope.core.sae import SAE, SparseCode
from saescope.core.schema import REQUIRED, Config, config_field

SAE_HELP = ("SAE folder (saescope run or checkpoint, Qwen-Scope, SAELens, Gemma Scope or sparsify), a Gemma Scope params.npz, "
            "or a Qwen-Scope hub repo")
MODEL_DTYPES = ("fp32", "bf16", "auto")


@dataclass(kw_only=True)
class ModelDtypeOption(Config):
    """`--model-dtype`: the dtype of the language model whose activations a command reads."""

    model_dtype: str = config_field("fp32", "the LM's dtype: fp32 (figures comparable across machines), bf16, or auto (bf16 "
                                    "on GPU and on CPUs measured fast at it, ~2-3x faster there; what training's default "
                                    "uses)", choices=MODEL_DTYPES)


@dataclass(kw_only=True)
class SAESource(Config):
    """Which SAEs to read and with which language model (`--sae --model --k`), written once here: what fine-tuning
    reads (SASFT, RL), which loads the model for training."""

    sae: str = config_field(REQUIRED, SAE_HELP)
    model: str | None = config_field(None, "the language model (default: the one the SAEs name)")
    k: int | None = config_field(None, K_HELP, min=1)

    def load_scope(self, layers: list[int] | None = None, dtype: str = "fp32",
                   check: Callable[[dict[int, SAE]], None] | None = None) -> Scope:
        """The language model with these SAEs (only `layers` of them when given: 64K SAEs are large); `check` as for
        Scope.load."""
        return Scope.load(self.sae, self.model, layers=layers, dtype=dtype, k=self.k, check=check)


@dataclass(kw_only=True)
class SAEOptions(SAESource, ModelDtypeOption):
    """The SAEs, their model and its dtype (`--sae --model --k --model-dtype`): the fields of every command that reads
    SAEs' features."""

    def load_scope(self, layers: list[int] | None = None, dtype: str | None = None,
                   check: Callable[[dict[int, SAE]], None] | None = None) -> Scope:
        return super().load_scope(layers, dtype or self.model_dtype, check)


@dataclass
class TextCodes:
    tokens: list[str]
    input_ids: Tensor  # (seq,)
    layers: dict[int, SparseCode]  # per layer: indices, values of shape (seq, k)


def _pool(x: Tensor, keep: Tensor, pool: str) -> Tensor:
    """(batch, seq, d) pooled over the kept positions of each row: max or mean."""
    masked = x.masked_fill(~keep[..., None], 0)
    if pool == "max":
        return masked.amax(1)
    return masked.sum(1) / keep.sum(1, keepdim=True).clamp_min(1)


def _pool_code(code: SparseCode, row_of_token: Tensor, n_rows: int, d_sae: int, pool: str, n_kept: Tensor) -> Tensor:
    """(n_rows, d_sae) max or mean over each row's tokens of their sparse codes (tokens, k), `row_of_token` saying
    whose each token is: what _pool gives on the dense codes, without building (rows, seq, d_sae)."""
    flat = (row_of_token[:, None] * d_sae + code.indices).reshape(-1)
    out = code.values.new_zeros(n_rows * d_sae)
    if pool == "max":  # codes are >= 0, so a zero start is what a max over the row's tokens (or none) gives
        out.scatter_reduce_(0, flat, code.values.reshape(-1), "amax")
    else:
        weight = (1 / n_kept.clamp_min(1).to(code.values.dtype))[row_of_token]
        out.index_add_(0, flat, (code.values * weight[:, None]).reshape(-1))
    return out.view(n_rows, d_sae)


def check_fit(lm: LoadedModel, saes: dict[int, SAE]) -> None:
    """Refuse SAEs that cannot apply to this model: wrong width or a layer it does not have."""
    for n, sae in saes.items():
        if sae.cfg.d_model != lm.d_model:
            raise SaescopeError(f"the layer {n} SAE has d_model {sae.cfg.d_model}, but {lm.name} has d_model {lm.d_model}")
        if not 0 <= n < lm.n_layers:
            raise SaescopeError(f"SAE for layer {n}, but {lm.name} has layers 0..{lm.n_layers - 1}")


def place_saes(lm: LoadedModel, saes: dict[int, SAE]) -> None:
    """Check SAEs against the model and put them where it runs: on its device, and encoding in bf16 when it reads in
    bf16 (one dtype end to end, as a training step computes; the read commands' default --model-dtype fp32 keeps both
    fp32, and their figures comparable across machines)."""
    check_fit(lm, saes)
    for sae in saes.values():
        sae.to(lm.device)
        if lm.dtype == torch.bfloat16:
            sae.compute_dtype = torch.bfloat16


def model_of(saes: dict[int, SAE], given: str | None, origin: str | object = "these SAEs") -> str:
    """The model to load for these SAEs: the one given, else the one they record. Qwen-Scope and SAELens files often
    do not say; guessing a default model would mislead."""
    model = given or next(iter(saes.values())).meta.get("model")
    if not model:
        raise ParamError(f"the SAEs at {str(origin).replace('{', '{{').replace('}', '}}')} do not name their model: give {{}}", "model")
    return model


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ",".join(map(str, layers))


class Scope:
    def __init__(self, lm: LoadedModel, saes: dict[int, SAE]):
        place_saes(lm, saes)
        self.lm = lm
        self.saes = saes

    @classmethod
    def load(cls, sae: str, model: str | None = None, *, layers: list[int] | None = None, dtype: str = "fp32",
             device: str | None = None, k: int | None = None,
             check: Callable[[dict[int, SAE]], None] | None = None) -> Scope:
        """The SAEs at SAE (only `layers` of them) with their model (`model`, else the one they name). `check` sees the
        SAEs before the model loads: what must be refused (a rules file for other SAEs, a feature id out of range) is
        refused without loading a model for nothing."""
        saes = load_saes(sae, layers=layers, k=k)
        if check is not None:
            check(saes)
        return cls(load_model(model_of(saes, model, sae), dtype=dtype, device=device), saes)

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    def check_layers(self, layers: list[int] | None) -> list[int]:
        for n in layers or []:
            self.sae(n)
        return sorted(set(layers)) if layers else self.layers

    def _token_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids of each text; texts longer than max_length (or the model's context) are cut, with a warning."""
        if not texts:
            raise SaescopeError("no texts to encode")
        ids = self.lm.tokenizer(list(texts))["input_ids"]
        context = getattr(self.lm.model.config, "max_position_embeddings", None)
        max_length = min(max_length, context) if context else max_length
        cut = []
        for i, x in enumerate(ids):
            if not x:
                raise SaescopeError(f"text {i} (of {len(texts)}) is empty: it has no token to read features from")
            if len(x) > max_length:
                cut.append(len(x))
                ids[i] = x[:max_length]
        if cut:  # one warning for the set, not one per text
            why = "the model's context" if max_length == context else "raise max_length to read more"
            what = (f"a text of {cut[0]} tokens was cut to its" if len(cut) == 1 else
                    f"{len(cut)} of {len(texts)} texts (up to {max(cut)} tokens) were cut to their")
            warnings.warn(f"{what} first {max_length} tokens ({why})", stacklevel=3)
        return ids

    def _pad(self, ids: list[list[int]]) -> dict[str, Tensor]:
        tok = self.lm.tokenizer
        tok.padding_side = "right"
        return {k: v.to(self.lm.device) for k, v in tok.pad({"input_ids": ids}, return_tensors="pt").items()}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, layers: list[int] | None = None, batch_size: int = 8,
               max_length: int = 512, progress: bool = True) -> list[TextCodes]:
        if isinstance(texts, str):
            texts = [texts]
        layers = self.check_layers(layers)
        all_ids = self._token_ids(texts, max_length)  # once: one warning for the set when texts are cut
        out: list[TextCodes] = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not progress or len(texts) <= batch_size):
            enc = self._pad(all_ids[start : start + batch_size])
            acts = capture(self.lm.model, enc["input_ids"], layers, attention_mask=enc["attention_mask"])
            codes = {n: self.saes[n].encode(acts[n].reshape(-1, acts[n].shape[-1]).float()) for n in layers}
            seq = enc["input_ids"].shape[1]
            for i in range(enc["input_ids"].shape[0]):
                length = int(enc["attention_mask"][i].sum())
                ids = enc["input_ids"][i, :length].cpu()
                per_layer = {}
                for n, c in codes.items():
                    rows = slice(i * seq, i * seq + length)
                    per_layer[n] = SparseCode(c.indices[rows].cpu(), c.values[rows].cpu())
                out.append(TextCodes(token_strings(self.lm.tokenizer, ids.tolist()), ids, per_layer))
        return out

    @torch.no_grad()
    def iter_pooled(self, texts: Sequence[str], *, layers: list[int] | None = None, pool: str = "last",
                    batch_size: int = 16, max_length: int = 512, skip_first_token: bool = False, progress: bool = True,
                    sae_sets: dict[str, dict[int, SAE]] | None = None, desc: str = "encode",
                    with_residual: bool = False, residual_pool: str | None = None
                    ) -> Iterator[tuple[list[int], dict[str, dict[int, Tensor]]]]:
        """Per batch of texts: their positions in `texts` and, per SAE set and layer, (batch, d_sae) dense
        activations pooled over each text's tokens: the last token's code, the max or the mean over tokens; with
        pool="max+mean", both from one encoding, stacked ((2, batch, d_sae): max first).

        sae_sets (default {"sae": self.saes}) lets one LM pass feed several SAE sets, e.g. the trained SAEs and
        their random control. with_residual adds the residual stream itself, pooled the same way (or as
        residual_pool says), as the set "residual" ((batch, d_model): what a dense probe reads).

        Texts are batched by length (less padding); with pool="last" only the last token is encoded, so the
        SAE cost does not grow with prompt length. skip_first_token leaves position 0 out of the max (on
        models without BOS it is the attention sink, whose huge norm gives codes unrelated to the text)."""
        residual_pool = residual_pool or pool
        if pool not in ("max", "last", "mean", "max+mean"):
            raise SaescopeError(f"unknown pooling {pool!r}; use max, mean, max+mean or last")
        if with_residual and residual_pool not in ("max", "last", "mean"):
            raise SaescopeError(f"unknown pooling of the residual {residual_pool!r}; use max, mean or last")
        if isinstance(texts, str):
            texts = [texts]
        layers = layers or self.layers
        sae_sets = sae_sets or {"sae": self.saes}
        for name, saes in sae_sets.items():
            for n in layers:
                if n not in saes:
                    raise SaescopeError(f"no SAE for layer {n} in the {name} set (have {sorted(saes)})")
            place_saes(self.lm, {n: saes[n] for n in layers})
        ids = self._token_ids(texts, max_length)  # once; batches only pad
        lengths = [len(x) for x in ids]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        # Batches hold at most batch_size texts and batch_size * 128 padded tokens: peak memory is set by the
        # budget, not by the longest prompt in the set (a few 512-token prompts would otherwise triple it).
        budget, batches = batch_size * 128, [[]]
        for i in order:
            if batches[-1] and (len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * lengths[i] > budget):
                batches.append([])
            batches[-1].append(i)
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress or len(batches) <= 1):
            enc = self._pad([ids[i] for i in idx])
            acts = capture(self.lm.model, enc["input_ids"], layers, attention_mask=enc["attention_mask"])
            n_tok = enc["attention_mask"].sum(1)
            rows = torch.arange(len(idx), device=n_tok.device)
            keep = enc["attention_mask"].bool().clone()
            if skip_first_token:
                keep[:, 0] &= n_tok <= 1
            row_of_token, n_kept = keep.nonzero()[:, 0], keep.sum(1)  # only kept tokens are encoded, never padding
            pooled: dict[str, dict[int, Tensor]] = {name: {} for name in sae_sets}
            for name, saes in sae_sets.items():
                for n in layers:
                    sae = saes[n]
                    if pool == "last":
                        pooled[name][n] = sae.encode(acts[n][rows, n_tok - 1].float()).dense(sae.cfg.d_sae)
                        continue
                    code = sae.encode(acts[n][keep].float())
                    got = [_pool_code(code, row_of_token, len(idx), sae.cfg.d_sae, how, n_kept) for how in pool.split("+")]
                    pooled[name][n] = got[0] if len(got) == 1 else torch.stack(got)
            if with_residual:
                pooled["residual"] = {n: acts[n][rows, n_tok - 1].float() if residual_pool == "last"
                                      else _pool(acts[n].float(), keep, residual_pool)
                                      for n in layers}
            yield idx, pooled

    def pooled(self, texts: Sequence[str], *, layer: int, pool: str = "max", skip_first_token: bool = False,
               **kw) -> Tensor:
        """(n_texts, d_sae) feature activations per text: max or mean over tokens, or the last token's (max+mean: both,
        (2, n_texts, d_sae))."""
        out: Tensor | None = None
        for idx, per_layer in self.iter_pooled(texts, layers=[layer], pool=pool, skip_first_token=skip_first_token, **kw):
            rows = per_layer["sae"][layer]
            if out is None:
                out = rows.new_zeros(*rows.shape[:-2], 1 if isinstance(texts, str) else len(texts), rows.shape[-1])
            out[..., torch.as_tensor(idx, device=out.device), :] = rows
        assert out is not None
        return out

    def pre_activations(self, input_ids: Tensor, *, layer: int, latents: Sequence[int] | Tensor,
                        attention_mask: Tensor | None = None) -> Tensor:
        """Pre-activations (batch, seq, len(latents)) of chosen features, with gradients flowing into the model
        (for an auxiliary fine-tuning loss such as SASFT's)."""
        sae = self.sae(layer)
        idx = torch.as_tensor(latents, device=sae.W_enc.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sae.cfg.d_sae):
            raise SaescopeError(f"feature index out of range 0..{sae.cfg.d_sae - 1}")
        got: dict[str, Tensor] = {}
        with layer_hooks(self.lm.model, {layer: lambda h: got.__setitem__("h", h)}):
            self.lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return sae.pre_activations(got["h"].float(), idx)

    def sae(self, layer: int) -> SAE:
        if layer not in self.saes:
            raise SaescopeError(f"no SAE for layer {layer} (have {_span(self.layers)})")
        return self.saes[layer]

    def steer(self, layer: int, features: dict[int, float]):
        """Context manager: every forward or generate call inside adds sum strength x W_dec[f] at `layer`."""
        from saescope.api.steer import feature_vector, steering

        return steering(self.lm.model, layer=layer, vector=feature_vector(self.sae(layer), features))

    def direction(self, *, layer: int, feature: int) -> Tensor:
        sae = self.sae(layer)
        if not 0 <= feature < sae.cfg.d_sae:
            raise SaescopeError(f"feature {feature} is out of range 0..{sae.cfg.d_sae - 1}")
        return sae.W_dec[feature].detach()
