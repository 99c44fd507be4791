"""`saescope inspect | features | steer | serve`: thin wrappers over saescope.apps.inspect and saescope.api.steer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saescope.cli.flags import add_sae_flags, add_shared_data_flag, layer_list, writes
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="top features per text and layer; with --baseline, features that fire more on one set")
    add_sae_flags(p)
    p.add_argument("--texts", required=True, help="a text, a file (jsonl/json/csv/tsv, or txt/md: one text per blank-line "
                                                  "separated paragraph) or a benchmark name (gsm8k, mgsm_fr...)")
    p.add_argument("--baseline", help="contrast mode: texts to compare against (same forms as --texts)")
    p.add_argument("--column", help="for files: the text column")
    p.add_argument("--limit", type=int, help="at most this many texts per set (a seeded random subset)")
    p.add_argument("--by", default="max", choices=["max", "sum"], help="rank a text's features by max or summed activation")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--rank", default="rate", choices=["rate", "mean"],
                   help="contrast mode: rank by firing-rate difference or by mean-activation difference")
    p.add_argument("--keep-first-token", action="store_true", help="count the first token (the attention sink) too")
    p.add_argument("--max-length", type=int, default=512, help="longer texts are cut, with a warning")
    p.add_argument("--store", help="feature store for frequencies and contexts (default: SAE/features when present)")
    p.add_argument("--control", help="contrast mode: a random control (saescope control random), the chance level")
    add_shared_data_flag(p)
    writes(p, "--out", folder=False, help="JSON results (default: SAE/inspect/inspect.json or contrast.json)")

    p = sub.add_parser("features", help="the feature store: per-feature statistics, top contexts, logit lens")
    fsub = p.add_subparsers(dest="features_command", required=True)
    b = fsub.add_parser("build", help="one pass over a corpus recording every feature's statistics and top contexts")
    add_sae_flags(b)
    b.add_argument("--data", help="corpus (default: the embedded corpus)")
    b.add_argument("--text-column", default="text")
    b.add_argument("--max-tokens", type=int, default=200_000)
    b.add_argument("--ctx-len", type=int, default=128)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--top-n", type=int, default=16, help="top contexts kept per feature")
    b.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints (--resume continues)")
    b.add_argument("--browse-layers", help="layers in the report's feature browser (default: up to 3 spread over the store)")
    writes(b, "--out", folder=True, help="store folder (default: SAE/features)")
    b.add_argument("--resume", action="store_true")
    b.add_argument("--overwrite", action="store_true")
    s = fsub.add_parser("show", help="one feature: frequency, activation histogram, top contexts, logit lens, experts")
    s.add_argument("--store", required=True)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--feature", type=int, required=True)
    s.add_argument("--contexts", type=int, default=8)
    s.add_argument("--json", action="store_true")
    e = fsub.add_parser("experts", help="MoE stores: per expert, the features most associated with it")
    e.add_argument("--store", required=True)
    e.add_argument("--layer", type=int, required=True)
    e.add_argument("--top", type=int, default=10)
    r = fsub.add_parser("browser", help="(re)write the report's feature browser section from a store")
    r.add_argument("--store", required=True)
    r.add_argument("--layers", help="layers to include (default: up to 3)")
    writes(r, "--out", folder=False, help="HTML fragment (default: STORE/report-section.html)")

    p = sub.add_parser("steer", help="generate with strength x decoder direction added at a layer, beside the unsteered output")
    add_sae_flags(p, layers=False)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--feature", required=True, help="feature id(s): 3 or 3,7")
    p.add_argument("--strength", required=True, help="one strength for all, or one per feature: 8 or 8,-4")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    writes(p, "--out", folder=False, help="JSON results file")

    p = sub.add_parser("serve", help="local web app: per-token features, feature cards, steering")
    add_sae_flags(p)
    p.add_argument("--store", help="feature store (default: SAE/features when present)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def _store_for(a: argparse.Namespace, scope):
    from saescope.api.store import FeatureStore

    default = RunDir.of_sae(a.sae).features
    path = a.store or (default if (default / "store.json").exists() else None)
    if not path:
        return None
    store = FeatureStore(path)
    store.check_matches(scope.saes, a.sae)
    return store


def _texts(spec: str, column: str | None, limit: int | None) -> list[str]:
    """A benchmark name or prompt file (through the benchmark loader, which refuses a folder), else the argument
    itself as one text. A mistyped path must not be inspected as if it were the text: what looks like one is refused."""
    from saescope.core.data.benchmarks import BENCHMARKS, HUB, OLMO, load_benchmark
    from saescope.core.data.rows import row_format
    from saescope.core.data.sources import is_path
    from saescope.apps.inspect.texts import check_texts

    if spec in BENCHMARKS or spec.startswith((OLMO, HUB)) or is_path(spec):
        return check_texts(load_benchmark(spec, limit=limit, column=column).prompts, f"{spec}: text")
    if row_format(spec.rstrip()) or spec.rstrip().lower().endswith(".gz") or ("/" in spec and not any(c.isspace() for c in spec)):
        raise SaescopeError(f"no such file: {spec[:200]}; to inspect these characters as a text, put them in a .txt file and pass that")
    return check_texts([spec], "text")


def _snippet(ctx: dict, width: int = 60) -> str:
    toks, m = ctx["tokens"], ctx["mark"]
    text = "".join(toks[:m]) + "[[" + toks[m] + "]]" + "".join(toks[m + 1 :])
    return " ".join(text.split())[:width]


def cmd_inspect(a: argparse.Namespace) -> None:
    from saescope.api.controls import load_control
    from saescope.core.files import atomic_write_json
    from saescope.apps.inspect.render import write_inspect_section
    from saescope.apps.inspect.texts import InspectConfig, chance_contrast, contrast, inspect_texts
    from saescope.api.scope import Scope

    if a.baseline is not None and not a.baseline.strip():
        raise SaescopeError("--baseline is empty: give the texts to contrast against, or leave it out")
    if a.control and not a.baseline:
        raise SaescopeError("--control gives the chance level of a contrast: use it with --baseline")
    texts = _texts(a.texts, a.column, a.limit)
    baseline = _texts(a.baseline, a.column, a.limit) if a.baseline else None
    cfg = InspectConfig(layers=layer_list(a.layers), top=a.top, by=a.by, skip_first_token=not a.keep_first_token,
                        max_length=a.max_length, rank=a.rank)
    scope = Scope.load(a.sae, a.model, layers=cfg.layers, k=a.k, dtype=a.model_dtype)  # only the layers asked for: 64K SAEs are large
    store = _store_for(a, scope)
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).inspect / ("contrast.json" if baseline else "inspect.json")
    if baseline is None:
        res = inspect_texts(scope, texts, cfg, store)
        for entry in res:
            print(f"\n{json.dumps(entry['text'][:100], ensure_ascii=False)} ({len(entry['tokens'])} tokens)")
            for n, rows in entry["layers"].items():
                for r in rows:
                    where = ", ".join(f"{t!r}@{p}" for p, t, _ in sorted(r["fired_on"], key=lambda x: -x[2])[:3])
                    extra = f"  freq {r['frequency']:.4f}  e.g. {_snippet(r['contexts'][0])!r}" if r.get("contexts") else ""
                    print(f"  L{n:<3} f{r['feature']:<6} {a.by} {r['score']:8.2f}  on {where}{extra}")
        payload = {"mode": "inspect", "sae": a.sae, "by": a.by, "store": str(store.path) if store else None, "texts": res}
    else:
        res = contrast(scope, texts, baseline, cfg, store)
        payload = {"mode": "contrast", "sae": a.sae, "texts": a.texts, "baseline": a.baseline, "rank": a.rank,
                   "store": str(store.path) if store else None, **res}
        if a.control:
            ctl = Scope(scope.lm, load_control(a.control, scope.saes))
            payload["control"] = {"path": a.control, "best_rate_diff": chance_contrast(contrast(ctl, texts, baseline, cfg))}
        print(f"features firing more on {a.texts} ({len(texts)} texts) than on {a.baseline} ({len(baseline)} texts)")
        for n, v in res["layers"].items():
            chance = payload.get("control", {}).get("best_rate_diff", {}).get(n)
            print(f"\nlayer {n}" + (f"  (random control's best rate difference: {chance:.4f})" if chance is not None else ""))
            print(f"  {'feature':>8} {'rate':>7} {'base':>7} {'diff':>7} {'mean':>7} {'base':>7} {'texts':>6}  top context")
            for r in v["more_on_texts"]:
                ctx = repr(_snippet(r["contexts"][0])) if r.get("contexts") else ""
                print(f"  {r['feature']:>8} {r['rate']:7.4f} {r['rate_baseline']:7.4f} {r['rate_diff']:7.4f} {r['mean']:7.3f} "
                      f"{r['mean_baseline']:7.3f} {r['text_rate']:6.2f}  {ctx}")
    atomic_write_json(out, payload)
    write_inspect_section(payload, out.with_name(f"report-section-{out.stem}.html"))
    print(f"\nresults: {out}")


def cmd_features(a: argparse.Namespace) -> None:
    {"build": _build, "show": _show, "experts": _experts, "browser": _browser}[a.features_command](a)


def _build(a: argparse.Namespace) -> None:
    from saescope.apps.inspect.render import write_browser_section
    from saescope.api.store import FeatureStore, StoreConfig, build_feature_store
    from saescope.api.scope import Scope

    cfg = StoreConfig(max_tokens=a.max_tokens, ctx_len=a.ctx_len, batch_size=a.batch_size, top_n=a.top_n,
                      checkpoint_every=a.checkpoint_every, data=a.data, text_column=a.text_column)
    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), k=a.k, dtype=a.model_dtype)
    if a.browse_layers and (outside := sorted(set(layer_list(a.browse_layers)) - set(scope.layers))):
        raise SaescopeError(f"--browse-layers {a.browse_layers}: layer {outside[0]} is not among the layers built ({scope.layers})")
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).features
    sae_name = str(Path(a.sae).resolve()) if Path(a.sae).exists() else a.sae
    print(f"feature store for {len(scope.layers)} layers x {next(iter(scope.saes.values())).cfg.d_sae} features over "
          f"{cfg.n_batches * cfg.batch_size * cfg.ctx_len} tokens -> {out}")
    build_feature_store(scope.lm, scope.saes, out, cfg, sae_spec=sae_name, resume=a.resume, overwrite=a.overwrite)
    store = FeatureStore(out)
    seconds, rss = store.meta["build"]["seconds"], store.meta["build"]["peak_rss_mb"]
    for n in store.layers:
        freq = store.frequencies(n)
        print(f"  layer {n:>3}: {int((freq > 0).sum())} of {len(freq)} features fired; "
              f"median frequency of those {float(freq[freq > 0].median()) if (freq > 0).any() else 0:.5f}")
    section = write_browser_section(store, layer_list(a.browse_layers))
    print(f"{store.meta['tokens']} tokens in {seconds:.0f} s ({store.meta['tokens'] / seconds:.0f} tok/s), peak RSS {rss:.0f} MB")
    print(f"feature store: {out}; report section: {section}")


def _show(a: argparse.Namespace) -> None:
    from saescope.api.store import FeatureStore

    info = FeatureStore(a.store).feature(a.layer, a.feature, contexts=a.contexts)
    if a.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return
    print(f"layer {a.layer} feature {a.feature}: fires on {info['frequency']:.5f} of tokens ({info['fire_count']}), "
          f"mean activation {info['mean_activation']:.3f}, max {info['max_activation']:.3f}")
    print("promotes: " + " ".join(repr(t) for t, _ in info["promoted"]))
    print("suppresses: " + " ".join(repr(t) for t, _ in info["suppressed"]))
    if "experts" in info:
        dist = info["experts"]["distribution"]
        top = sorted(range(len(dist)), key=lambda e: -dist[e])[:4]
        print(f"experts: entropy {info['experts']['entropy_bits']:.2f} of {info['experts']['max_entropy_bits']:.2f} bits; "
              + ", ".join(f"e{e} {dist[e]:.2f} (lift {info['experts']['lift'][e]:.1f})" for e in top))
    for c in info["contexts"]:
        print(f"  {c['activation']:7.2f}  {_snippet(c, 100)!r}")


def _experts(a: argparse.Namespace) -> None:
    from saescope.api.store import FeatureStore, expert_features

    store = FeatureStore(a.store)
    if not store.meta.get("moe"):
        raise SaescopeError(f"{a.store} was built on a dense model: it has no expert routing")
    for row in expert_features(store, store.check_layer(a.layer), top=a.top):
        feats = ", ".join(f"f{r['feature']} x{r['lift']:.1f}" for r in row["features"])
        print(f"expert {row['expert']:>3} ({row['token_share']:.3f} of tokens): {feats}")


def _browser(a: argparse.Namespace) -> None:
    from saescope.apps.inspect.render import write_browser_section
    from saescope.api.store import FeatureStore

    print(f"feature browser: {write_browser_section(FeatureStore(a.store), layer_list(a.layers), Path(a.out) if a.out else None)}")


def cmd_steer(a: argparse.Namespace) -> None:
    from saescope.core.files import atomic_write_json
    from saescope.api.scope import Scope
    from saescope.api.steer import parse_features, steered_pair, typical_norm

    features = parse_features(a.feature, a.strength)
    for i, prompt in enumerate(a.prompt):
        if not prompt.strip():
            raise SaescopeError(f"--prompt {i + 1} is empty")
    scope = Scope.load(a.sae, a.model, layers=[a.layer], k=a.k, dtype=a.model_dtype)
    sae = scope.sae(a.layer)
    results = []
    norm = typical_norm(scope.lm, a.layer, a.prompt)
    label = ", ".join(f"{s:+g} x f{f}" for f, s in features.items())
    print(f"steering layer {a.layer} with {label} (median token norm at this layer on the prompts: {norm:.1f})")
    for prompt in a.prompt:
        pair = steered_pair(scope.lm, sae, layer=a.layer, features=features, prompt=prompt,
                            max_new_tokens=a.max_new_tokens, chat=a.chat, temperature=a.temperature)
        results.append(pair)
        print(f"\nprompt:     {prompt!r}\nunsteered:  {pair['unsteered']!r}\nsteered:    {pair['steered']!r}")
    if a.out:
        atomic_write_json(Path(a.out), {"sae": a.sae, "layer": a.layer, "features": {str(f): s for f, s in features.items()},
                                        "median_token_norm": norm, "results": results})
        print(f"\nresults: {a.out}")


def cmd_serve(a: argparse.Namespace) -> None:
    from saescope.apps.inspect.serve import serve
    from saescope.api.scope import Scope

    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), k=a.k, dtype=a.model_dtype)
    serve(scope, store=_store_for(a, scope), host=a.host, port=a.port)


COMMANDS = {"inspect": cmd_inspect, "features": cmd_features, "steer": cmd_steer, "serve": cmd_serve}
