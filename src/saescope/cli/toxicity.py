"""`saescope toxicity mine | classify | eval`: auditable toxicity rules from SAE features (saescope.apps.toxicity)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from saescope.cli.flags import add_model_dtype_flag, add_shared_data_flag, layer_list, writes
from saescope.core.errors import SaescopeError
from saescope.core.io import RunDir

LABEL_HELP = ("labelled texts: a built-in set (hatecheck_en, or a Multilingual HateCheck language: mhc_french or french, "
              "...) or a csv/jsonl/parquet file with text and label columns (labels: hateful/non-hateful, toxic/clean, "
              "1/0, true/false)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toxicity", help="toxicity rules from SAE features: mine, classify with an audit log, evaluate")
    tsub = p.add_subparsers(dest="toxicity_command", required=True)

    m = tsub.add_parser("mine", help="rank features by P(fire | toxic) - P(fire | clean) and write the top-K rules")
    m.add_argument("--sae", required=True)
    add_model_dtype_flag(m)
    m.add_argument("--model", help="default: the SAEs' model")
    m.add_argument("--data", required=True, help=LABEL_HELP)
    _data_columns(m)
    m.add_argument("--layers", help="layers to mine (default: all the SAEs' layers)")
    m.add_argument("--k", default="1,2,5,10", help="rule sizes to mine (default: 1,2,5,10)")
    m.add_argument("--threshold", type=float, default=0.0, help="a feature fires when its max activation exceeds this")
    m.add_argument("--split", choices=["mine", "all"], default="mine",
                   help="mine on the mining side of the template split (default; `eval` then scores the other side) "
                        "or on every text (when the evaluation data is elsewhere)")
    m.add_argument("--fraction", type=float, default=1.0, help="mine on this share of the mining templates")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--batch-size", type=int, default=32)
    add_shared_data_flag(m)
    writes(m, "--out", folder=False, help="rules file (default: SAE/toxicity/rules.json)")

    c = tsub.add_parser("classify", help="apply a rule to texts; one audit record per decision")
    c.add_argument("--rules", required=True)
    c.add_argument("--texts", required=True, help="a text, a file (one text per row), or a built-in labelled set")
    c.add_argument("--text-column", help="for files: the text column (default: text)")
    c.add_argument("--label-column", help="for files with labels: print precision/recall/F1 too")
    c.add_argument("--rule", help="which rule of the file (default: the file's default)")
    c.add_argument("--sae", help="the SAEs (default: the path the rules file records)")
    add_model_dtype_flag(c)
    c.add_argument("--store", help="feature store for the audit's evidence (default: SAE/features when present)")
    c.add_argument("--limit", type=int, help="at most this many texts (the first ones of a file; a seeded random sample of "
                   "a labelled set)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--max-length", type=int, default=256)
    add_shared_data_flag(c)
    writes(c, "--audit", folder=False, help="JSON lines, one per decision (default: next to the rules, audit.jsonl)")

    e = tsub.add_parser("eval", help="F1 per language and functionality, beside the control, a residual probe and a "
                        "lexical baseline; F1 against mining fraction; the transfer matrix")
    e.add_argument("--rules", required=True)
    e.add_argument("--data", help="labelled texts to evaluate on (default: the rules' mining data); " + LABEL_HELP)
    _data_columns(e)
    e.add_argument("--sae", help="the SAEs (default: the path the rules file records)")
    add_model_dtype_flag(e)
    e.add_argument("--control", help="a random control (saescope control random), mined and scored the same way")
    e.add_argument("--fractions", default="0.1,0.25,0.5,1", help="shares of the mining templates for the curve")
    e.add_argument("--draws", type=int, default=5, help="random subsets per share below 1")
    e.add_argument("--transfer", help="languages for the transfer matrix (comma-separated built-in sets, or `all`)")
    e.add_argument("--batch-size", type=int, default=32)
    add_shared_data_flag(e)
    writes(e, "--json", folder=False, help="results (default: next to the rules, eval.json)")


def _data_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", help="for files (default: text)")
    p.add_argument("--label-column", help="for files (default: label)")
    p.add_argument("--group-column", help="for files: the template/group column used to split (default: templ_id if "
                   "present, else each text is its own group)")


def _labelled(spec: str, a: argparse.Namespace):
    from saescope.core.data.labelled import load_labelled

    return load_labelled(spec, text_column=a.text_column, label_column=a.label_column, group_column=a.group_column)


def _mining_side(data, split: str, fraction: float, seed: int):
    import numpy as np

    from saescope.core.data.labelled import group_split
    from saescope.apps.toxicity.evaluate import group_subset

    side = group_split(data, seed=seed)[0] if split == "mine" else data
    if fraction < 1:
        side = side.subset(group_subset(side, fraction, np.random.default_rng(seed)), f"{side.name}[{fraction:g}]")
    return side


def cmd_mine(a: argparse.Namespace) -> None:
    from saescope.api.scope import Scope
    from saescope.apps.toxicity import encode_labelled, make_ruleset
    from saescope.apps.toxicity.rules import check_ks

    ks = check_ks(a.k)
    if not 0 < a.fraction <= 1:
        raise SaescopeError(f"--fraction must be in (0, 1], got {a.fraction}")
    if a.threshold < 0:
        raise SaescopeError(f"--threshold must be >= 0 (activations are), got {a.threshold}")
    data = _labelled(a.data, a)  # data first: a bad label fails before the model loads
    side = _mining_side(data, a.split, a.fraction, a.seed)
    out = Path(a.out) if a.out else RunDir.of_sae(a.sae).toxicity / "rules.json"
    scope = Scope.load(a.sae, a.model, layers=layer_list(a.layers), dtype=a.model_dtype)
    enc = encode_labelled(scope, side, threshold=a.threshold, residual=False, batch_size=a.batch_size)
    source = {"data": a.data if side.language or not Path(a.data).is_file() else str(Path(a.data).resolve()),
              "columns": {"text": a.text_column, "label": a.label_column, "group": a.group_column},
              "split": a.split, "fraction": a.fraction, "seed": a.seed, "data_hash": data.content_hash()}
    rules = make_ruleset(enc.hits["sae"], side, scope.saes, model=scope.lm.name, sae=str(a.sae), ks=ks,
                         threshold=a.threshold, mining=source)
    rules.save(out)
    print(f"mined on {side.name}: {len(side)} texts ({side.counts()[1]} positive); layer chosen by top1-diff: "
          f"{rules.choice['chosen_layer']}")
    for r in rules.rules:
        feats = ", ".join(f"L{f.layer}/{f.feature} ({f.delta:+.2f})" for f in r.features)
        mark = "  <- default" if r.name == rules.default else ""
        print(f"  {r.name:<12} on the mining texts F1 {rules.choice['mining_f1'][r.name]:.3f}, balanced accuracy "
              f"{rules.choice['mining_balanced_accuracy'][r.name]:.3f}: {feats}{mark}")
    print(f"rules: {out}")


def cmd_classify(a: argparse.Namespace) -> None:
    import numpy as np

    from saescope.core.data.labelled import text_source
    from saescope.api.store import FeatureStore
    from saescope.api.scope import Scope
    from saescope.apps.toxicity import AuditLog, RuleClassifier, RuleSet, scores

    rules = RuleSet.load(a.rules)
    rule = rules.rule(a.rule)
    source = text_source(a.texts, text_column=a.text_column, label_column=a.label_column, limit=a.limit, literal=True,
                         flag="--texts")
    texts, total = source.texts, source.n
    labels = source.labelled.labels.tolist() if source.labelled is not None else None
    sae = a.sae or rules.sae
    scope = Scope.load(sae, rules.model, layers=rule.layers, dtype=a.model_dtype)
    store_path = Path(a.store) if a.store else RunDir.of_sae(sae).features
    store = FeatureStore(store_path) if (a.store or (store_path / "store.json").is_file()) else None
    if store is not None:
        store.check_matches(scope.saes, sae)
    clf = RuleClassifier(scope, rules, a.rule, sae_spec=sae, store=store)
    audit = AuditLog(Path(a.audit) if a.audit else Path(a.rules).with_name("audit.jsonl"), rules, rule)
    preds: list[bool] = []
    start = time.perf_counter()
    try:
        for d in clf.decisions(texts, batch_size=a.batch_size, max_length=a.max_length, total=total):
            audit.write(d)
            preds.append(d.positive)
    except BaseException:
        audit.abandon()
        raise
    audit.close()
    seconds = time.perf_counter() - start
    if audit.path.parent == Path(a.rules).parent and audit.path.name == "audit.jsonl":
        from saescope.apps.toxicity.render import write_section

        write_section(audit.path.parent)
    n = len(preds)
    print(f"rule {rule.name} ({len(rule.features)} features on layer(s) {', '.join(map(str, rule.layers))}): "
          f"{sum(preds)} of {n} texts positive; {n / seconds:.1f} texts/s; full encoder run on "
          f"{clf.candidate_tokens} of {clf.tokens} tokens")
    if labels is not None:
        s = scores(np.array(preds), np.array(labels))
        print(f"against the labels: F1 {s['f1']:.3f}, precision {s['precision']:.3f}, recall {s['recall']:.3f}, "
              f"accuracy {s['accuracy']:.3f}")
    print(f"audit: {audit.path}")


def cmd_eval(a: argparse.Namespace) -> None:
    from saescope.api.controls import load_control
    from saescope.core.data.labelled import MHC_LANGUAGES, builtin_name, group_split
    from saescope.core.files import atomic_write_json
    from saescope.api.scope import Scope
    from saescope.apps.toxicity import BenchConfig, RuleSet, benchmark, encode_labelled, transfer_matrix
    from saescope.apps.toxicity.evaluate import format_benchmark, format_transfer

    rules = RuleSet.load(a.rules)
    try:
        fractions = tuple(float(x) for x in a.fractions.split(","))
    except ValueError:
        raise SaescopeError(f"--fractions must be comma-separated numbers, got {a.fractions!r}") from None
    ks = tuple(sorted({r.k for r in rules.rules}))
    cfg = BenchConfig(ks=ks, fractions=fractions, draws=a.draws, seed=int(rules.mining.get("seed", 0)))
    source = rules.mining.get("data")
    if not isinstance(source, str):
        raise SaescopeError(f"{a.rules}: the rules do not record their mining data")
    cols = rules.mining.get("columns") or {}
    from saescope.core.data.labelled import load_labelled

    mining_data = load_labelled(source, text_column=cols.get("text"), label_column=cols.get("label"),
                                group_column=cols.get("group"))
    if mining_data.content_hash() != rules.mining.get("data_hash"):
        raise SaescopeError(f"the mining data {source} has changed since the rules were mined (its hash differs)")
    if rules.mining.get("split") != "mine":
        raise SaescopeError(f"{a.rules} was mined on all of {source}: mine with --split mine for an evaluation on held-out templates")
    layers = sorted(int(n) for n in rules.choice["layer_best_delta"])
    sae = a.sae or rules.sae
    scope = Scope.load(sae, rules.model, layers=layers, dtype=a.model_dtype)
    rules.check_saes(scope.saes, sae, scope.lm.name, origin=str(a.rules))
    control = load_control(a.control, scope.saes) if a.control else None
    encode = lambda ds: encode_labelled(scope, ds, control=control, threshold=rules.threshold,  # noqa: E731
                                        batch_size=a.batch_size)
    mine_side, held_out = group_split(mining_data, seed=cfg.seed)
    mine_enc = encode(mine_side)
    same = not a.data or a.data == source or (builtin_name(source) is not None and builtin_name(a.data) == builtin_name(source))
    held_enc = encode(held_out) if same or a.transfer else None
    target_enc = held_enc if same else encode(group_split(_labelled(a.data, a), seed=cfg.seed)[1])
    result = benchmark(mine_enc, target_enc, cfg, rules=rules.rules)
    result.update(rules=str(a.rules), sae=sae, control_path=a.control, model=scope.lm.name)
    print(format_benchmark(result))
    if a.transfer:
        langs = list(MHC_LANGUAGES) if a.transfer == "all" else [x.strip() for x in a.transfer.split(",") if x.strip()]
        for lang in langs:
            if not builtin_name(lang):
                raise SaescopeError(f"--transfer: unknown language {lang!r}; built-in: {', '.join(MHC_LANGUAGES)}")
        sides = {mining_data.language or mining_data.name: (mine_enc, held_enc)}
        for lang in langs:
            name = builtin_name(lang).removeprefix("mhc_")
            if name in sides:
                continue
            m, h = group_split(load_labelled(lang), seed=cfg.seed)
            sides[name] = (encode(m), encode(h))
        result["transfer"] = transfer_matrix(sides, cfg)
        print(format_transfer(result["transfer"]))
    out = Path(a.json) if a.json else Path(a.rules).with_name("eval.json")
    atomic_write_json(out, result)
    print(f"toxicity eval: {out}")
    if out.parent == Path(a.rules).parent:
        from saescope.apps.toxicity.render import write_section

        print(f"report section: {write_section(out.parent)}")


def cmd_toxicity(a: argparse.Namespace) -> None:
    {"mine": cmd_mine, "classify": cmd_classify, "eval": cmd_eval}[a.toxicity_command](a)


COMMANDS = {"toxicity": cmd_toxicity}
