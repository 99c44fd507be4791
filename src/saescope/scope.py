"""The Python API the applications build on: a language model with its SAEs behind one object.

    scope = Scope.load("runs/x")                     # model taken from the SAEs' config
    codes = scope.encode(["some text", ...])         # per text, per layer: (tokens, k) indices/values
    pooled = scope.pooled(texts, layer=12, pool="max")  # (n_texts, d_sae)
    pre = scope.pre_activations(ids, layer=12, latents=[3, 7])  # differentiable into the model
    direction = scope.direction(layer=12, feature=3)  # unit decoder row, for steering
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saescope.errors import SaescopeError
from saescope.io import load_saes
from saescope.models import LoadedModel, capture, layer_hooks, load_model
from saescope.sae import SparseCode, TopKSAE


@dataclass
class TextCodes:
    tokens: list[str]
    input_ids: Tensor  # (seq,)
    layers: dict[int, SparseCode]  # per layer: indices, values of shape (seq, k)


def check_fit(lm: LoadedModel, saes: dict[int, TopKSAE]) -> None:
    """Refuse SAEs that cannot apply to this model: wrong width or a layer it does not have."""
    for n, sae in saes.items():
        if sae.cfg.d_model != lm.d_model:
            raise SaescopeError(f"the layer {n} SAE has d_model {sae.cfg.d_model}, but {lm.name} has d_model {lm.d_model}")
        if not 0 <= n < lm.n_layers:
            raise SaescopeError(f"SAE for layer {n}, but {lm.name} has layers 0..{lm.n_layers - 1}")


class Scope:
    def __init__(self, lm: LoadedModel, saes: dict[int, TopKSAE]):
        check_fit(lm, saes)
        for sae in saes.values():
            sae.to(lm.device)
        self.lm = lm
        self.saes = saes

    @classmethod
    def load(cls, sae: str, model: str | None = None, *, layers: list[int] | None = None, dtype: str = "fp32",
             device: str | None = None, k: int | None = None) -> Scope:
        saes = load_saes(sae, layers=layers, k=k)
        model = model or next(iter(saes.values())).meta.get("model")
        return cls(load_model(model, dtype=dtype, device=device), saes)

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    def _tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise SaescopeError("no texts to encode")
        tok = self.lm.tokenizer
        tok.padding_side = "right"
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return {k: v.to(self.lm.device) for k, v in enc.items()}

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, layers: list[int] | None = None, batch_size: int = 8,
               max_length: int = 512, progress: bool = True) -> list[TextCodes]:
        layers = layers or self.layers
        out: list[TextCodes] = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not progress or len(texts) <= batch_size):
            enc = self._tokenize(texts[start : start + batch_size], max_length)
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
                out.append(TextCodes(self.lm.tokenizer.convert_ids_to_tokens(ids.tolist()), ids, per_layer))
        return out

    def pooled(self, texts: Sequence[str], *, layer: int, pool: str = "max", skip_first_token: bool = False,
               **kw) -> Tensor:
        """(n_texts, d_sae) feature activations per text: max over tokens, or the last token's."""
        if pool not in ("max", "last"):
            raise SaescopeError(f"unknown pooling {pool!r}; use max or last")
        d_sae = self.saes[layer].cfg.d_sae
        rows = []
        for tc in self.encode(texts, layers=[layer], **kw):
            dense = tc.layers[layer].dense(d_sae)
            if skip_first_token and dense.shape[0] > 1:
                dense = dense[1:]
            rows.append(dense.max(0).values if pool == "max" else dense[-1])
        return torch.stack(rows)

    def pre_activations(self, input_ids: Tensor, *, layer: int, latents: Sequence[int] | Tensor,
                        attention_mask: Tensor | None = None) -> Tensor:
        """Pre-activations (batch, seq, len(latents)) of chosen features, with gradients flowing into the model
        (for an auxiliary fine-tuning loss such as SASFT's)."""
        sae = self.saes[layer]
        idx = torch.as_tensor(latents, device=sae.W_enc.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sae.cfg.d_sae):
            raise SaescopeError(f"feature index out of range 0..{sae.cfg.d_sae - 1}")
        got: dict[str, Tensor] = {}
        with layer_hooks(self.lm.model, {layer: lambda h: got.__setitem__("h", h)}):
            self.lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return sae.pre_activations(got["h"].float(), idx)

    def direction(self, *, layer: int, feature: int) -> Tensor:
        sae = self.saes[layer]
        if not 0 <= feature < sae.cfg.d_sae:
            raise SaescopeError(f"feature {feature} is out of range 0..{sae.cfg.d_sae - 1}")
        return sae.W_dec[feature].detach()
