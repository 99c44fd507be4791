"""Seed stability over whole runs: compare two SAE sets layer by layer, or train N seeds of one configuration on the
same data and compare each with the first, beside a random control (what matching gives by chance).

    from saescope.core.train import TrainConfig
    from saescope.apps.trust.seeds import train_seeds
    results = train_seeds(TrainConfig(preset="4x-k32", max_tokens=200_000, out="runs/seeds"), n_seeds=2)
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from saescope.api.controls import make_controls
from saescope.apps.trust.stability import stability_report
from saescope.core.activations import sample_activations
from saescope.core.errors import SaescopeError
from saescope.core.files import atomic_write_json
from saescope.core.io import RunDir, decoder_cos_to_init
from saescope.core.models import LoadedModel
from saescope.core.sae import SAE
from saescope.core.train import TrainConfig, Trainer

STUCK_COS = 0.9  # median decoder cosine to the initialisation above which an SAE has barely learned anything


def stability_between(saes_a: dict[int, SAE], saes_b: dict[int, SAE], lm: LoadedModel | None, out: Path, *,
                      data: str | None = None, text_column: str = "text", n_tokens: int = 16384,
                      control: dict[int, SAE] | None = None, labels: tuple[str, str] = ("A", "B")) -> dict:
    """Stability of every shared layer (decoder matching; activation correlations when `lm` is given), and of A
    against `control` for chance, written to OUT as JSON and returned. `labels` name the two sets; when they are run
    folders, their decoders' distance from initialisation is recorded too, and a warning says when they barely moved."""
    layers = sorted(set(saes_a) & set(saes_b))
    if not layers:
        raise SaescopeError(f"the two SAE sets share no layer (A: {sorted(saes_a)}, B: {sorted(saes_b)})")
    acts = sample_activations(lm, layers, data=data, text_column=text_column, n_tokens=n_tokens) if lm else {}
    moved = [decoder_cos_to_init(Path(label)) for label in labels]
    per_layer, chance = {}, {}
    for n in layers:
        per_layer[n] = stability_report(saes_a[n], saes_b[n], acts.get(n))
        per_layer[n]["decoder_cos_to_init"] = [m.get(str(n)) for m in moved]
        if control is not None:
            chance[n] = stability_report(saes_a[n], control[n], acts.get(n))
    stuck = [(n, c) for n in layers for c in per_layer[n]["decoder_cos_to_init"] if c is not None and c > STUCK_COS]
    if stuck:
        n, c = stuck[0]
        warnings.warn(f"the decoders barely moved from their random initialisation (median cosine to init {c:.3f} at layer "
                      f"{n}): seeds cannot agree on features that have not been learned yet; train longer", stacklevel=2)
    result = {"a": str(labels[0]), "b": str(labels[1]), "layers": per_layer, "control": chance or None}
    atomic_write_json(out, {**result, "layers": {str(n): r for n, r in per_layer.items()},
                            "control": {str(n): r for n, r in chance.items()} or None})
    return result


def seed_configs(cfg: TrainConfig, n_seeds: int) -> list[TrainConfig]:
    """N runs of `cfg` with seeds seed..seed+N-1 in OUT/seed-S, all reading the data in the same order (data_seed)."""
    if n_seeds < 2:
        raise SaescopeError(f"a seed comparison needs at least 2 seeds, got {n_seeds}")
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    return [replace(cfg, seed=cfg.seed + i, data_seed=data_seed, out=str(Path(cfg.out) / f"seed-{cfg.seed + i}"))
            for i in range(n_seeds)]


def train_seeds(cfg: TrainConfig | list[TrainConfig], n_seeds: int = 2, *, resume: bool = False,
                n_tokens: int = 16384, on_trained=None) -> dict[str, dict]:
    """Train the runs of `seed_configs(cfg, n_seeds)` (or the given list of configs) one after the other on one
    loaded model, then compare each with the first beside a random control of the first (written to
    FIRST/trust/stability-seed-S.json). `resume` continues runs that have checkpoints. `on_trained(trainer, summary)`
    is called after each run (the command line prints there). Returns {other run's folder: stability result}."""
    configs = cfg if isinstance(cfg, list) else seed_configs(cfg, n_seeds)
    runs: list[tuple[TrainConfig, dict[int, SAE]]] = []  # each trainer (and its optimizer state) is dropped once saved
    lm = None
    for c in configs:
        trainer = Trainer(c, lm=lm)
        if resume:
            trainer.load_checkpoint()
        summary = trainer.fit()
        if on_trained is not None:
            on_trained(trainer, summary)
        lm = trainer.lm
        saes = {n: st.sae for n, st in trainer.states.items()}
        for sae in saes.values():
            sae.zero_grad(set_to_none=True)
        runs.append((trainer.cfg, saes))
        del trainer
    (first_cfg, first), others = runs[0], runs[1:]
    chance = make_controls(first, seed=first_cfg.seed + len(runs))  # what matching gives by chance, in the same table
    results = {}
    for other_cfg, other in others:
        out = RunDir(first_cfg.out).trust / f"stability-seed-{other_cfg.seed}.json"
        results[other_cfg.out] = {"path": str(out), **stability_between(
            first, other, lm, out, data=first_cfg.data, text_column=first_cfg.text_column, n_tokens=n_tokens,
            control=chance, labels=(first_cfg.out, other_cfg.out))}
    return results
