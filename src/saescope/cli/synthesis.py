"""`saescope coverage | synthesize`: which target features a dataset fires, the smallest subset of a pool that
keeps that coverage, and generated examples aimed at the targets it misses (saescope.apps.synthesis)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import add_model_dtype_flag, add_shared_data_flag, layer_list, writes
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir
from saescope.core.schema import check_number

DATA_HELP = "a built-in labelled set (hatecheck_en, french, ...) or a file of texts (labels optional)"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coverage", help="the fraction of target features a dataset fires; --select: the smallest subset "
                       "of a labelled pool that keeps it, beside random subsets")
    p.add_argument("--sae", required=True)
    add_model_dtype_flag(p)
    p.add_argument("--model", help="default: the SAEs' model")
    p.add_argument("--targets", help="a targets file, a rules file (its features), or ids such as 15:3,15:40")
    p.add_argument("--derive-from", help="derive targets from this labelled set instead: features its positive (and "
                   "negative) texts fire that the other class rarely does")
    p.add_argument("--n", type=int, default=60, help="derived targets, half per class (default: 60)")
    p.add_argument("--layers", help="layers to derive targets on (default: all the SAEs' layers)")
    p.add_argument("--background-rate", type=float, help="derived targets must fire on at most this share of general-text "
                   "tokens (the feature store's frequency; needs SAE/features or --store): features specific to the set")
    p.add_argument("--store", help="feature store for --background-rate (default: SAE/features)")
    p.add_argument("--data", help="the dataset whose coverage is measured: " + DATA_HELP)
    p.add_argument("--text-column", help="for files (default: text)")
    p.add_argument("--label-column", help="for files (default: label)")
    p.add_argument("--select", action="store_true", help="greedy selection on --data's mining side (template split), "
                   "F1 of rules mined on it against the whole and random subsets, on the held-out side")
    p.add_argument("--goals", default="0.5,0.8,0.9,1", help="coverage goals for --select")
    p.add_argument("--batch-size", type=int, default=32)
    add_shared_data_flag(p)
    writes(p, "--json", folder=False, help="results (default: SAE/toxicity/coverage.json)")
    writes(p, "--save-targets", folder=False, help="where derived targets go (default: SAE/toxicity/targets.json)")

    s = sub.add_parser("synthesize", help="generate examples aimed at the target features --data does not fire; keep "
                       "each only if it fires its target; the same budget unguided as the control")
    s.add_argument("--sae", required=True)
    add_model_dtype_flag(s)
    s.add_argument("--model", help="default: the SAEs' model")
    s.add_argument("--targets", required=True, help="a targets file, a rules file, or ids such as 15:3,15:40")
    s.add_argument("--data", required=True, help="the seed dataset: " + DATA_HELP)
    s.add_argument("--text-column", help="for files (default: text)")
    s.add_argument("--generator", help="the model that writes candidates (default: the SAEs' own model)")
    s.add_argument("--budget", type=int, default=400, help="candidates generated in all")
    s.add_argument("--per-target", type=int, default=4, help="candidates per target per round")
    s.add_argument("--steer", default="0", help="steer toward the target feature while generating (only with the SAEs' "
                   "own model): a strength in the residual stream's units (8), or a multiple of each target's top "
                   "activation in the feature store (2x; the layer's median top activation for a target the store "
                   "never saw fire)")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--store", help="feature store for the evidence (default: SAE/features when present)")
    s.add_argument("--seed", type=int, default=0)
    add_shared_data_flag(s)
    writes(s, "--out", folder=False, help="kept examples, JSON lines (default: SAE/toxicity/synthesized.jsonl); "
           "the figures go beside it (.json)")


def _texts(spec: str, text_column: str | None, label_column: str | None = None):
    """(texts, labelled set or None)."""
    from saescope.core.data.labelled import text_source

    source = text_source(spec, text_column=text_column, label_column=label_column)
    return list(source.texts), source.labelled


def _targets(a: argparse.Namespace, scope, out_dir: Path):
    from saescope.core.data.labelled import load_labelled
    from saescope.core.io import fingerprint
    from saescope.apps.synthesis.coverage import TargetSet, derive_targets, load_targets
    from saescope.apps.toxicity import encode_labelled

    if bool(a.targets) == bool(getattr(a, "derive_from", None)):
        raise SaescopeError("give --targets or --derive-from (one of them)")
    if a.targets:
        targets = load_targets(a.targets)
        targets.check_saes(scope.saes, a.sae)
        return targets
    ds = load_labelled(a.derive_from)
    if getattr(a, "select", False):  # the selection is scored on held-out templates: targets never see them
        from saescope.core.data.labelled import group_split

        ds = group_split(ds)[0]
    background = None
    if a.background_rate is not None:
        from saescope.api.store import FeatureStore

        store = FeatureStore(Path(a.store) if a.store else RunDir.of_sae(a.sae).features)
        store.check_matches(scope.saes, a.sae)
        background = {n: store.frequencies(store.check_layer(n)).numpy() for n in scope.layers}
    enc = encode_labelled(scope, ds, residual=False, batch_size=a.batch_size)
    derived = derive_targets(enc.hits["sae"], ds.labels, n=a.n, background=background,
                             max_background=a.background_rate if a.background_rate is not None else 1.0)
    targets = TargetSet(derived, scope.lm.name, a.sae, {n: fingerprint(scope.saes[n]) for n in {t.layer for t in derived}})
    path = Path(a.save_targets) if a.save_targets else out_dir / "targets.json"
    targets.save(path)
    print(f"{len(derived)} targets derived from {ds.name} ({sum(t.label == 'positive' for t in derived)} positive): {path}")
    return targets


def _as_set(texts: list[str], ds, name: str):
    import numpy as np

    from saescope.core.data.labelled import LabelledSet

    return ds if ds is not None else LabelledSet(name, texts, np.zeros(len(texts), dtype=np.int64),
                                                 [f"row{i}" for i in range(len(texts))], [""] * len(texts))


def cmd_coverage(a: argparse.Namespace) -> None:
    from saescope.core.data.labelled import group_split, test_mask
    from saescope.core.files import atomic_write_json
    from saescope.api.scope import Scope
    from saescope.apps.synthesis.coverage import coverage, format_selection, selection_study, target_matrix
    from saescope.apps.toxicity import encode_labelled

    if not a.data:
        raise SaescopeError("--data is required: the dataset whose coverage is measured")
    goals = tuple(float(x) for x in a.goals.split(",")) if a.select else ()
    if any(not 0 < g <= 1 for g in goals):
        raise SaescopeError(f"--goals must be in (0, 1], got {a.goals}")
    texts, ds = _texts(a.data, a.text_column, a.label_column)
    if a.select and ds is None:
        raise SaescopeError("--select needs labelled --data (a built-in set, or a file with --label-column)")
    out_dir = RunDir.of_sae(a.sae).toxicity
    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), dtype=a.model_dtype)
    targets = _targets(a, scope, out_dir)
    data = _as_set(texts, ds, Path(a.data).name)
    enc = encode_labelled(scope, data, layers=targets.layers, residual=False, batch_size=a.batch_size)
    fired = target_matrix(enc.hits["sae"], targets.targets)
    cov = coverage(fired)
    result = {"data": a.data, "n_texts": len(texts), **cov,
              "targets": [{**vars(t), "texts": c} for t, c in zip(targets.targets, cov["texts_per_target"], strict=True)],
              "uncovered": [[t.layer, t.feature] for t, c in zip(targets.targets, cov["texts_per_target"], strict=True) if not c]}
    print(f"coverage of {len(targets.targets)} targets by {a.data} ({len(texts)} texts): {cov['coverage']:.1%} "
          f"({cov['covered']} covered, {len(result['uncovered'])} not)")
    if a.select:
        group_split(ds)  # refuses a split that leaves one class on a side
        held = test_mask(ds)
        result["selection"] = selection_study(enc.subset(~held), enc.subset(held), targets.targets, goals=goals)
        print(format_selection(result["selection"]))
    out = Path(a.json) if a.json else out_dir / "coverage.json"
    atomic_write_json(out, result)
    print(f"coverage results: {out}")


def cmd_synthesize(a: argparse.Namespace) -> None:
    from saescope.core.files import atomic_write_json
    from saescope.api.store import FeatureStore
    from saescope.core.models import load_model
    from saescope.api.scope import Scope
    from saescope.apps.synthesis.coverage import target_matrix
    from saescope.apps.synthesis.generate import SynthConfig, synthesize
    from saescope.apps.toxicity import encode_labelled
    from saescope.apps.toxicity.classify import write_jsonl

    steer, relative = parse_steer(a.steer)
    cfg = SynthConfig(budget=a.budget, per_target=a.per_target, max_new_tokens=a.max_new_tokens, steer=steer,
                      steer_relative=relative, seed=a.seed)
    texts, ds = _texts(a.data, a.text_column)
    from saescope.apps.synthesis.coverage import load_targets

    targets = load_targets(a.targets)
    scope = Scope.load(a.sae, a.model, layers=targets.layers, dtype=a.model_dtype)
    targets.check_saes(scope.saes, a.sae)
    if a.generator:
        try:
            generator = load_model(a.generator)
        except Exception as exc:  # any failure to load is the user's input here, named in one line
            raise SaescopeError(f"--generator {a.generator}: cannot be loaded ({str(exc).splitlines()[0][:200]})") from None
        if steer:
            raise SaescopeError("--steer needs the SAEs' own model as the generator (leave out --generator)")
    else:
        generator = scope.lm
    store_path = Path(a.store) if a.store else RunDir.of_sae(a.sae).features
    evidence = {}
    if a.store or (store_path / "store.json").is_file():
        store = FeatureStore(store_path)
        store.check_matches(scope.saes, a.sae)
        scale = {n: _median_top_activation(store, n) for n in targets.layers if n in store.layers}
        for t in targets.targets:
            if t.layer in store.layers:
                got = store.feature(t.layer, t.feature, contexts=cfg.contexts)
                evidence[(t.layer, t.feature)] = {"contexts": ["".join(c["tokens"]) for c in got["contexts"]],
                                                  "promoted": [w for w, _ in got["promoted"]],
                                                  "max_activation": got["max_activation"] or scale[t.layer]}
    elif relative:
        raise SaescopeError(f"--steer {a.steer}: a multiple of the top activation needs a feature store ({store_path} has "
                            "none; build one with saescope features build, or pass --store)")
    else:
        print("no feature store: prompts carry the target's class only (build one with saescope features build)")
    enc = encode_labelled(scope, _as_set(texts, ds, Path(a.data).name), layers=targets.layers, residual=False)
    covered = target_matrix(enc.hits["sae"], targets.targets).any(0)
    result = synthesize(scope, generator, targets.targets, covered, cfg, evidence=evidence)
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).toxicity / "synthesized.jsonl"
    write_jsonl(out, result["examples"])
    result.update(data=a.data, generator=generator.name, targets=a.targets, evidence=bool(evidence))
    atomic_write_json(out.with_suffix(".json"), result)
    u = result["unguided"]
    print(f"coverage of {result['n_targets']} targets: {result['coverage_before']:.1%} with {a.data} -> "
          f"{result['coverage_after']:.1%} after synthesis ({result['kept']} kept of {result['generated']} generated, "
          f"{result['seconds']:.0f} s); unguided, same budget: {u['coverage_after']:.1%} ({u['generated']} generated, "
          f"{u['seconds']:.0f} s)")
    eq = result["at_equal_data"]
    print(f"at equal data ({eq['examples']} examples added to each): guided {eq['guided']:.1%}, unguided {eq['unguided']:.1%} "
          f"(unguided kept {u['kept']} of its {u['generated']} candidates)")
    print(f"examples: {out}")


def parse_steer(spec: str) -> tuple[float, bool]:
    """'8' -> (8.0, False): absolute; '2x' -> (2.0, True): times each target's top activation."""
    text = str(spec).strip().lower()
    relative = text.endswith("x")
    try:
        value = float(text[:-1] if relative else text)
    except ValueError:
        raise SaescopeError(f"--steer {spec!r}: give a number (8) or a multiple of the top activation (2x)") from None
    return check_number(value, "--steer", kind=float), relative and value != 0


def _median_top_activation(store, layer: int) -> float:
    """The layer's median top activation over the features the store saw fire: the scale for one it never saw."""
    top = store.top_activations(layer)
    fired = top[top > 0]
    return float(fired.median()) if len(fired) else 0.0


COMMANDS = {"coverage": cmd_coverage, "synthesize": cmd_synthesize}
