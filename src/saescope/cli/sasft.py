"""`saescope discover` (the SAE features behind a behaviour, checked by steering) and `saescope sasft` (fine-tuning
that keeps them from firing), over saescope.api.behaviour and saescope.apps.sasft."""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.cli.flags import add_config_flags, add_model_dtype_flag, add_shared_data_flag, config_from_flags, writes
from saescope.core.errors import SaescopeError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from saescope.apps.sasft.train import SASFTConfig

    d = sub.add_parser("discover", help="rank the SAE features of a behaviour (repetition, or a language) and check them "
                       "by steering both ways beside random directions")
    d.add_argument("--sae", required=True)
    add_model_dtype_flag(d)
    d.add_argument("--model", help="default: the SAEs' model")
    d.add_argument("--layer", type=int, required=True)
    d.add_argument("--behaviour", required=True, help="repetition, or language:LANG (an MGSM language: en fr es de ja ...)")
    d.add_argument("--texts", help="repetition: a file of degenerate texts (default: the real looping M-IFEval answers "
                   "of the shared data, train side)")
    d.add_argument("--text-column", default="text")
    d.add_argument("--top", type=int, default=10, help="features to rank")
    d.add_argument("--select", type=int, default=3, help="how many of the top features `sasft --features FILE` uses")
    d.add_argument("--verify", type=int, default=24, help="prompts to steer on (0: skip the steering check)")
    d.add_argument("--strength", type=float, help="steering strength (default: the layer's median token norm)")
    d.add_argument("--max-new-tokens", type=int, default=96)
    add_shared_data_flag(d)
    writes(d, "--out", folder=False, help="features file (default: SAE/behaviour/<behaviour>-layer<L>.json)")

    s = sub.add_parser("sasft", help="fine-tune (full or LoRA, TRL's SFTTrainer) with SASFT's loss: CE + lambda * "
                       "sum ReLU(pre-activation - alpha) over the unwanted features")
    s.add_argument("--features", required=True, help="feature ids (3,7) or a features file from `saescope discover`")
    s.add_argument("--lambda", dest="lam", type=float, default=0.1, help="weight of L_reduce (0 = plain SFT, the control)")
    add_config_flags(s, SASFTConfig, skip=("lam", "out", "sae", "layer", "model", "limit", "features"))
    s.add_argument("--sae", required=True, help="SAE folder (saescope run, Qwen-Scope, SAELens or sparsify)")
    s.add_argument("--layer", type=int, help="default: the features file's layer")
    s.add_argument("--model", help="default: the SAEs' model")
    s.add_argument("--limit", type=int, help="training pairs (default: all)")
    add_shared_data_flag(s)
    writes(s, "--out", folder=True, required=True, help="the fine-tuned model (a Hugging Face folder) and its logs")
    add_rl_parser(sub)


def _features(spec: str, layer: int | None) -> tuple[list[int], int | None]:
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise SaescopeError(f"--features {spec}: no such file")
        from saescope.core.files import read_json

        doc = read_json(path)
        if "selected" not in doc or "layer" not in doc:
            raise SaescopeError(f"{path}: not a features file from `saescope discover` (no 'selected' / 'layer')")
        if layer is not None and layer != doc["layer"]:
            raise SaescopeError(f"--layer {layer}, but {path} holds features of layer {doc['layer']}")
        return [int(f) for f in doc["selected"]], int(doc["layer"])
    try:
        return [int(x) for x in spec.split(",")], layer
    except ValueError:
        raise SaescopeError(f"--features must be ids such as 3,7 or a features .json file, got {spec!r}") from None


def cmd_sasft(a: argparse.Namespace) -> None:
    from saescope.apps.sasft.train import SASFTConfig, run_sasft

    features, layer = _features(a.features, a.layer)
    if layer is None:
        raise SaescopeError("--layer is needed with feature ids (a features file names its layer)")
    cfg = config_from_flags(SASFTConfig, a, features=features, layer=layer, lam=a.lam, out=a.out)
    summary = run_sasft(cfg)
    print(f"{'plain SFT' if cfg.lam == 0 else 'SASFT'} on {summary['pairs']} pairs, {summary['steps']} steps in "
          f"{summary['seconds']:.0f} s ({summary['seconds_per_step']:.2f} s/step); features {features} at layer {layer}, "
          f"alpha {summary['suppression']['alpha']}")
    _before_after(summary, ("loop_rate", "distinct_2", "language_rate", "feature_fire_rate", "heldout_loss", "arc_easy"))
    print(f"model: {a.out} (per-step CE, L_reduce and firing rate in {a.out}/train_log.jsonl)")


def _before_after(summary: dict, keys: tuple[str, ...]) -> None:
    rows = [(name, summary.get(f"heldout_{name}")) for name in ("before", "after")]
    rows = [(name, row) for name, row in rows if row]
    if not rows:
        return
    n = rows[0][1].get("prompts", rows[0][1].get("n"))
    print(f"held-out ({n} prompts)   " + " ".join(f"{k:>17}" for k in keys))
    for name, row in rows:
        print(f"  {name:<21}" + " ".join(f"{row[k]:>17.3f}" if row.get(k) is not None else f"{'-':>17}" for k in keys))


def cmd_discover(a: argparse.Namespace) -> None:
    from saescope.api.behaviour import language_features, mgsm_questions, repetition_features, verify_features
    from saescope.core.data import iter_texts
    from saescope.core.files import atomic_write_json
    from saescope.apps.sasft.data import degenerate_responses, train_prompts
    from saescope.api.scope import Scope
    from saescope.api.steer import typical_norm

    behaviour = a.behaviour
    language = None
    if behaviour.startswith("language:"):
        language = behaviour.split(":", 1)[1]
    elif behaviour != "repetition":
        raise SaescopeError(f"--behaviour {behaviour!r}: use repetition or language:LANG")
    if a.select > a.top:
        raise SaescopeError(f"--select {a.select} exceeds --top {a.top}")
    scope = Scope.load(a.sae, a.model, layers=[a.layer], dtype=a.model_dtype)
    if language:
        qs = mgsm_questions()
        if language not in qs:
            raise SaescopeError(f"language {language!r} is not in MGSM (have {', '.join(sorted(qs))})")
        ranked = language_features(scope, a.layer, {lang: q[:200] for lang, q in qs.items()}, language, top=a.top)
        source, n_source = "MGSM problems 0-199, 11 languages", 200 * len(qs)
        prompts = qs[language][200 : 200 + a.verify]
    else:
        texts = list(iter_texts(a.texts, text_column=a.text_column, split="all")) if a.texts else degenerate_responses("en")
        ranked, pairs = repetition_features(scope, a.layer, texts, top=a.top)
        source, n_source = a.texts or "looping M-IFEval answers (train side)", len(texts)
        prompts = train_prompts("en", limit=a.verify)
    print(f"layer {a.layer}, {behaviour}: top features by nu ({source}, {n_source} texts)")
    print(f"{'feature':>8} {'nu':>8} {'fires on':>9} {'fires off':>9}")
    for r in ranked:
        print(f"{r.feature:>8} {r.nu:>8.3f} {r.rate_on:>9.2f} {r.rate_off:>9.2f}")
    checks = []
    if a.verify:
        strength = a.strength or typical_norm(scope.lm, a.layer, prompts[:8])
        selected = [r.feature for r in ranked[: a.select]]
        how = "as given" if a.strength else "the layer's median token norm, the default"
        print(f"steering check: {len(prompts)} prompts, strength +-{strength:.1f} ({how}), "
              f"features {selected} beside 2 random directions")

        def show(c) -> None:
            rate = f" {language} {c.stats.language_rate:.2f}" if language else ""
            print(f"  {c.direction:>14} {c.strength:>+7.1f}: loop {c.stats.loop_rate:.2f} distinct-2 {c.stats.distinct_2:.2f}{rate}",
                  flush=True)

        checks = [c.to_dict() for c in verify_features(scope, a.layer, selected, prompts, strengths=(-strength, strength),
                                                       max_new_tokens=a.max_new_tokens, language=language, progress=show)]
    out = Path(a.out) if a.out else Path(a.sae) / "behaviour" / f"{behaviour.replace(':', '-')}-layer{a.layer}.json"
    doc = {"behaviour": behaviour, "layer": a.layer, "sae": str(a.sae), "model": scope.lm.name, "source": source,
           "n_texts": n_source, "ranked": [r.to_dict() for r in ranked], "selected": [r.feature for r in ranked[: a.select]],
           "steering_check": checks}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print(f"wrote {out} (selected: {doc['selected']})")


COMMANDS = {"sasft": cmd_sasft, "discover": cmd_discover}


def add_rl_parser(sub: argparse._SubParsersAction) -> None:
    from saescope.apps.rl.grpo import RLConfig

    r = sub.add_parser("rl", help="GRPO with the DAPO loss (TRL's GRPOTrainer), one rollout per group steered into a "
                       "feature and given the group's lowest reward")
    r.add_argument("--sae", help="SAE folder (needed for the steered negative)")
    r.add_argument("--model", help="default: the SAEs' model")
    r.add_argument("--layer", type=int, help="the layer to steer at")
    r.add_argument("--feature", help="the feature whose decoder direction steers the negative rollout: an id, or a features "
                   "file from `saescope discover` (its first selected feature and its layer)")
    add_config_flags(r, RLConfig, skip=("sae", "layer", "feature", "model", "out", "steered_negative"))
    r.add_argument("--no-steered-negative", action="store_true", help="plain GRPO: every rollout sampled normally (the control)")
    add_shared_data_flag(r)
    writes(r, "--out", folder=True, required=True, help="the trained model (a Hugging Face folder) and its logs")


def cmd_rl(a: argparse.Namespace) -> None:
    from saescope.apps.rl.grpo import RLConfig, run_rl

    steered = not a.no_steered_negative
    if steered and not a.sae:
        raise SaescopeError("the steered negative needs --sae, --layer and --feature (or pass --no-steered-negative)")
    feature, layer = -1, a.layer
    if a.feature is not None:
        features, layer = _features(a.feature, a.layer)
        if len(features) != 1 and not Path(a.feature).suffix == ".json":
            raise SaescopeError(f"--feature {a.feature}: give one feature id")
        feature = features[0]
    cfg = config_from_flags(RLConfig, a, sae=a.sae or "", model=a.model, out=a.out,
                            layer=-1 if layer is None else layer, feature=feature,
                            steered_negative=steered)
    s = run_rl(cfg)
    print(f"GRPO (DAPO loss), negative: {s['negative']}; {s['steps']} steps in {s['seconds']:.0f} s ({s['seconds_per_step']:.1f} s/step)")
    _before_after(s, ("accuracy", "loop_rate", "distinct_2"))
    print(f"model: {a.out} (per-step rewards and loop rates in {a.out}/train_log.jsonl)")


COMMANDS["rl"] = cmd_rl
