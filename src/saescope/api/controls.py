"""The one control mechanism every application uses: make a random-direction control of a set of
SAEs (`make_controls`, `saescope control random`), save it as an ordinary saescope SAE folder, and
load it beside the trained SAEs (`load_control`), which checks that it matches them. An application
then runs its unchanged pipeline on both and reports the two figures side by side.
"""

from __future__ import annotations

from pathlib import Path

from saescope.core.activations import sample_activations
from saescope.core.errors import SaescopeError
from saescope.core.io import load_saes, refuse_overwrite, save_native
from saescope.core.models import LoadedModel
from saescope.core.sae import TopKSAE, principal_basis, random_like


def make_controls(saes: dict[int, TopKSAE], *, seed: int = 0, subspace: str | None = None,
                  lm: LoadedModel | None = None, data: str | None = None, n_tokens: int = 8192,
                  variance: float = 0.9) -> dict[int, TopKSAE]:
    """A random control per layer. subspace='pca' draws the directions inside the principal subspace that
    explains `variance` of the layer's activations on `data` (needs the model `lm`)."""
    if subspace not in (None, "pca"):
        raise SaescopeError(f"unknown subspace {subspace!r}; use pca or leave it out")
    bases = {}
    if subspace == "pca":
        if lm is None:
            raise SaescopeError("a principal-subspace control needs the model (give --model or SAEs that name theirs)")
        acts = sample_activations(lm, sorted(saes), data=data, n_tokens=n_tokens, desc="activations for PCA")
        bases = {n: principal_basis(x, variance) for n, x in acts.items()}
    controls = {}
    for n, sae in saes.items():
        control = random_like(sae, seed=seed * 100_003 + n, basis=bases.get(n))
        control.meta["control"]["variance"] = variance if subspace else None
        controls[n] = control
    return controls


def save_controls(controls: dict[int, TopKSAE], out: Path, *, like: str) -> None:
    refuse_overwrite(out, [out / f"layer{n}.{ext}" for n in controls for ext in ("safetensors", "json")])
    for n, control in controls.items():
        control.meta["control"]["like"] = str(like)
        save_native(control, out, n)


def load_control(spec: str | Path, saes: dict[int, TopKSAE]) -> dict[int, TopKSAE]:
    """The control SAEs at SPEC for exactly the layers of `saes`, refusing any that do not match them."""
    controls = load_saes(spec, layers=sorted(saes))
    missing = sorted(set(saes) - set(controls))
    if missing:
        raise SaescopeError(f"control {spec} has no SAE for layer {missing[0]} (make it with `saescope control random --like ...`)")
    for n, sae in saes.items():
        c = controls[n]
        if (c.cfg.d_model, c.cfg.d_sae, c.cfg.k) != (sae.cfg.d_model, sae.cfg.d_sae, sae.cfg.k):
            raise SaescopeError(f"control {spec} layer {n} is d_model {c.cfg.d_model}, d_sae {c.cfg.d_sae}, k {c.cfg.k}; "
                                f"the SAE is d_model {sae.cfg.d_model}, d_sae {sae.cfg.d_sae}, k {sae.cfg.k}")
    return controls
