"""The one control mechanism every application uses: make a random-direction control of a set of SAEs
(`make_controls`, `saescope control random`), save it as an ordinary saescope SAE folder, and load it beside the
trained SAEs (`load_control`, the `control` field of every command that takes one), which checks that it matches
them. An application then runs its unchanged pipeline on both and reports the two figures side by side; one that
needs directions rather than a whole pipeline (SASFT's random arm, RL's random negative, discovery's steering check)
reads the control's decoder rows of the same feature ids.

Seeding: the control of layer n with seed s is `random_like(sae, seed=s * 100_003 + n)`, whether it is saved to a
folder or made in memory, so the same seed gives the same directions everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saescope.api.scope import model_of
from saescope.core.activations import sample_activations
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.io import K_HELP, load_saes, refuse_overwrite, save_native
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption
from saescope.core.models import LoadedModel, load_model
from saescope.core.sae import SAE, principal_basis, random_like
from saescope.core.schema import REQUIRED, Config, config_field, escape

CONTROL_HELP = ("a control SAE set made by `saescope control random|frozen-decoder|soft-frozen --like SAE`: the same "
                "figures on it beside the SAEs' (the chance level)")
# random: isotropic random directions; frozen-decoder / soft-frozen (Korznikov et al. 2026): the run trained again on the
# same tokens from the same initialisation, its decoder kept at its init, or held at cosine >= 0.8 to it
KINDS = ("random", "frozen-decoder", "soft-frozen")
TRAINED_KINDS = {"frozen-decoder": "frozen", "soft-frozen": "soft-frozen"}
SUBSPACES = ("pca",)


def make_controls(saes: dict[int, SAE], *, seed: int = 0, subspace: str | None = None,
                  lm: LoadedModel | None = None, data: str | None = None, n_tokens: int = 8192,
                  variance: float = 0.9) -> dict[int, SAE]:
    """A random control per layer. subspace='pca' draws the directions inside the principal subspace that
    explains `variance` of the layer's activations on `data` (needs the model `lm`)."""
    if subspace not in (None, *SUBSPACES):
        raise ParamError(f"unknown {{}} {subspace!r}; use pca or leave it out", "subspace")
    bases = {}
    if subspace == "pca":
        if lm is None:
            raise ParamError("a principal-subspace control needs the model: give {} or SAEs that name theirs", "model")
        acts = sample_activations(lm, sorted(saes), data=data, n_tokens=n_tokens, desc="activations for PCA")
        bases = {n: principal_basis(x, variance) for n, x in acts.items()}
    controls = {}
    for n, sae in saes.items():
        control = random_like(sae, seed=seed * 100_003 + n, basis=bases.get(n))
        control.meta["control"]["variance"] = variance if subspace else None
        controls[n] = control
    return controls


def save_controls(controls: dict[int, SAE], out: Path, *, like: str) -> None:
    refuse_overwrite(out, [out / f"layer{n}.{ext}" for n in controls for ext in ("safetensors", "json")])
    for n, control in controls.items():
        control.meta["control"]["like"] = str(like)
        save_native(control, out, n)


def load_control(spec: str | Path, saes: dict[int, SAE]) -> dict[int, SAE]:
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


@dataclass(kw_only=True)
class ControlOption(Config):
    """`--control`: the control set a command runs beside the SAEs (None: none)."""

    control: str | None = config_field(None, CONTROL_HELP)

    def load_control(self, saes: dict[int, SAE]) -> dict[int, SAE] | None:
        return load_control(self.control, saes) if self.control else None


@dataclass(kw_only=True)
class ControlsOption(Config):
    """`--control` given any number of times (eval, quality): the SAEs' margin over each control, with paired standard
    errors. One path given as a string is a list of one, as every other command takes it."""

    control: list[str] = config_field([], CONTROL_HELP + "; repeat it for the margin over each", repeat=True)

    def __post_init__(self) -> None:
        if isinstance(self.control, str):
            self.control = [self.control]
        elif self.control is None:
            self.control = []
        super().__post_init__()
        if len(set(self.control)) != len(self.control):
            raise ParamError("{} names the same control twice", "control")

    def load_controls(self, saes: dict[int, SAE]) -> dict[str, dict[int, SAE]]:
        """Each control (by its path, in the order given) for exactly the layers of `saes`."""
        return {spec: load_control(spec, saes) for spec in self.control}


def named_controls(control: dict[int, SAE] | None, controls: dict[str, dict[int, SAE]] | None) -> dict[str, dict[int, SAE]]:
    """The control sets a measurement runs beside the SAEs, by name: one given as `control` is named "control"; or
    several by name in `controls`; not both."""
    if control is not None and controls:
        raise SaescopeError("give control or controls, not both")
    return {"control": control} if control is not None else dict(controls or {})


def control_kind(controls: dict[int, SAE]) -> str:
    """What a control set is: random, random-subspace, frozen-decoder or soft-frozen (its SAEs' meta says)."""
    meta = next(iter(controls.values())).meta.get("control")
    return str(meta.get("kind", "unknown")) if isinstance(meta, dict) else "not a control"


@dataclass(kw_only=True)
class ControlConfig(LayersOption):
    """`saescope control random|frozen-decoder|soft-frozen`: a control shaped like trained SAEs. `random`: random
    directions (shape, k, decoder bias). `frozen-decoder` and `soft-frozen`: the saescope run --like trained again on the
    same tokens from the same initialisation, the decoder kept at its init or held at cosine >= 0.8 to it (Korznikov et
    al. 2026: how much of a figure the decoder's learning earns)."""

    kind: str = config_field(REQUIRED, "the kind of control", choices=KINDS, positional=True)
    like: str = config_field(REQUIRED, "the SAEs to imitate (shape, k, decoder bias); for a decoder control, the saescope "
                             "training run to train again")
    out: str = config_field(REQUIRED, "the control's folder (e.g. RUN/control)", output="folder")
    seed: int = config_field(0, "the control's seed (layer n uses seed x 100003 + n)", min=0)
    subspace: str | None = config_field(None, "draw directions inside the data's principal subspace", choices=SUBSPACES)
    variance: float = config_field(0.9, "with subspace pca: the variance the subspace explains", min=0, max=1, min_open=True)
    model: str | None = config_field(None, "with subspace pca: the model (default: the SAEs')")
    data: str | None = config_field(None, "with subspace pca: the text whose activations span the subspace (default: the "
                                    "embedded corpus's held-out split)")
    n_tokens: int = config_field(8192, "with subspace pca: activation sample size", min=1)
    k: int | None = config_field(None, K_HELP, min=1)

    def writes_into(self) -> Path:
        return Path(self.out)


@dataclass
class ControlResult:
    path: Path
    controls: dict[int, SAE]
    subspace: str | None

    def text(self) -> str:
        first = next(iter(self.controls.values())).cfg
        kind = next(iter(self.controls.values())).meta["control"]["kind"]
        if kind != "random" and kind != "random-subspace":
            return (f"{kind} control for {len(self.controls)} layers ({first.kind}, d_sae {first.d_sae}, k {first.k}), trained "
                    f"in {self.path}")
        dims = [c.meta["control"]["subspace_dim"] for c in self.controls.values()]
        detail = f", directions in the top {min(dims)}-{max(dims)} principal components" if self.subspace else ""
        return f"random control for {len(self.controls)} layers (d_sae {first.d_sae}, k {first.k}{detail}) in {self.path}"


def run_control(cfg: ControlConfig) -> ControlResult:
    if cfg.kind in TRAINED_KINDS:
        return _trained_control(cfg)
    return _random_control(cfg)


def _trained_control(cfg: ControlConfig) -> ControlResult:
    """The run --like, trained again into OUT with its decoder frozen or held near its init (the trainer holds OUT's
    lock; a killed control goes on where it stopped when asked again)."""
    from dataclasses import replace

    from saescope.core.files import read_json
    from saescope.core.io import RunDir
    from saescope.core.train import TrainConfig, run_train

    like = RunDir(cfg.like)
    if not like.train_config.is_file():
        raise ParamError(f"a {escape(cfg.kind)} control trains the SAEs again as they were trained: {{}} must be a saescope "
                         "training run (it holds no train.json)", "like")
    for name, value in (("subspace", cfg.subspace), ("model", cfg.model), ("data", cfg.data), ("k", cfg.k)):
        if value is not None:
            raise ParamError(f"{{}} is for random controls; a {escape(cfg.kind)} control trains on the run's own model and "
                             "data", name)
    trained = TrainConfig.from_dict(read_json(like.train_config), str(like.train_config))
    decoder = TRAINED_KINDS[cfg.kind]
    if RunDir(cfg.out).has_run():
        train = TrainConfig.resumed(cfg.out)
        if train.decoder != decoder:
            raise ParamError(f"{escape(cfg.out)} holds a {escape(train.decoder)}-decoder run, not a {escape(cfg.kind)} control; "
                             "choose another {}", "out")
        run_train(train, resume=True)
    else:
        layers = ",".join(map(str, cfg.layer_list())) if cfg.layers is not None else trained.layers
        run_train(replace(trained, out=cfg.out, decoder=decoder, layers=layers))
    return ControlResult(Path(cfg.out), load_saes(cfg.out), None)


@holding_lock
def _random_control(cfg: ControlConfig) -> ControlResult:
    saes = load_saes(cfg.like, layers=cfg.layer_list(), k=cfg.k)
    lm = load_model(model_of(saes, cfg.model, cfg.like), dtype="fp32") if cfg.subspace else None
    controls = make_controls(saes, seed=cfg.seed, subspace=cfg.subspace, lm=lm, data=cfg.data, n_tokens=cfg.n_tokens,
                             variance=cfg.variance)
    save_controls(controls, Path(cfg.out), like=cfg.like)
    return ControlResult(Path(cfg.out), controls, cfg.subspace)
