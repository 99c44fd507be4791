"""Looking inside as commands: `inspect` (the top features of texts, or a contrast of two sets of texts beside the
control), `features build | show | experts | browser` (the feature store and the report's browser) and `serve` (the
local web app), each a config and a run_* returning a result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from saescope.api.controls import ControlOption, control_kind
from saescope.api.scope import SAEOptions, Scope
from saescope.api.steer import parse_features, steered_pair, typical_norm
from saescope.api.store import FeatureStore, StoreConfig, build_feature_store, expert_features
from saescope.apps.inspect.render import write_browser_section, write_inspect_section
from saescope.apps.inspect.texts import ReadingConfig, chance_contrast, check_texts, contrast, inspect_texts
from saescope.core.data.benchmarks import BENCHMARKS, HUB, OLMO, SharedDataOption, load_benchmark
from saescope.core.data.rows import row_format
from saescope.core.data.sources import is_path
from saescope.core.errors import ParamError, SaescopeError
from saescope.core.files import atomic_write_json
from saescope.core.io import RunDir
from saescope.core.io.lock import holding_lock
from saescope.core.layers import LayersOption, parse_layers
from saescope.core.schema import REQUIRED, Config, config_field, escape

TEXTS_HELP = ("a text, a file (jsonl/json/csv/tsv, or txt/md: one text per blank-line separated paragraph) or a benchmark "
              "name (gsm8k, mgsm_fr...)")


def texts_of(spec: str, *, column: str | None = None, limit: int | None = None, shared_data: str | None = None) -> list[str]:
    """A benchmark name or prompt file (through the benchmark loader, which refuses a folder), else the argument itself as
    one text. A mistyped path must not be inspected as if it were the text: what looks like one is refused."""
    if spec in BENCHMARKS or spec.startswith((OLMO, HUB)) or is_path(spec):
        return check_texts(load_benchmark(spec, limit=limit, column=column, shared_data=shared_data).prompts, f"{spec}: text")
    if row_format(spec.rstrip()) or spec.rstrip().lower().endswith(".gz") or ("/" in spec and not any(c.isspace() for c in spec)):
        raise SaescopeError(f"no such file: {spec[:200]}; to inspect these characters as a text, put them in a .txt file and pass that")
    return check_texts([spec], "text")


def store_for(sae: str, scope: Scope, given: str | None) -> FeatureStore | None:
    """The feature store given, else SAE/features when there is one; checked against the SAEs it is read with."""
    default = RunDir.of_sae(sae).features
    path = given or (default if (default / "store.json").exists() else None)
    if not path:
        return None
    store = FeatureStore(path)
    store.check_matches(scope.saes, sae)
    return store


def snippet(ctx: dict, width: int = 60) -> str:
    toks, m = ctx["tokens"], ctx["mark"]
    text = "".join(toks[:m]) + "[[" + toks[m] + "]]" + "".join(toks[m + 1 :])
    return " ".join(text.split())[:width]


@dataclass(kw_only=True)
class InspectConfig(SAEOptions, ReadingConfig, ControlOption, SharedDataOption):
    """`saescope inspect`: top features per text and layer; with a baseline, the features that fire more on one set."""

    texts: str = config_field(REQUIRED, TEXTS_HELP)
    baseline: str | None = config_field(None, "contrast mode: texts to compare against (same forms as texts)")
    column: str | None = config_field(None, "for files: the text column")
    limit: int | None = config_field(None, "at most this many texts per set (a seeded random subset)", min=1)
    store: str | None = config_field(None, "feature store for frequencies and contexts (default: SAE/features when present)")
    out: str | None = config_field(None, "JSON results (default: SAE/inspect/inspect.json or contrast.json)", output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.baseline is not None and not self.baseline.strip():
            raise ParamError("{} is empty: give the texts to contrast against, or leave it out", "baseline")
        if self.control and not self.baseline:
            raise ParamError("{} gives the chance level of a contrast: use it with {}", "control", "baseline")

    def output(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).inspect / ("contrast.json" if self.baseline else "inspect.json")

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class InspectResult:
    path: Path
    payload: dict
    by: str

    def text(self) -> str:
        p = self.payload
        lines = []
        if p["mode"] == "inspect":
            for entry in p["texts"]:
                lines.append(f"\n{json.dumps(entry['text'][:100], ensure_ascii=False)} ({len(entry['tokens'])} tokens)")
                for n, rows in entry["layers"].items():
                    for r in rows:
                        where = ", ".join(f"{t!r}@{pos}" for pos, t, _ in sorted(r["fired_on"], key=lambda x: -x[2])[:3])
                        extra = f"  freq {r['frequency']:.4f}  e.g. {snippet(r['contexts'][0])!r}" if r.get("contexts") else ""
                        lines.append(f"  L{n:<3} f{r['feature']:<6} {self.by} {r['score']:8.2f}  on {where}{extra}")
        else:
            lines.append(f"features firing more on {p['texts']} ({p['n_texts']} texts) than on {p['baseline']} "
                         f"({p['n_baseline']} texts)")
            for n, v in p["layers"].items():
                chance = p.get("control", {}).get("best_rate_diff", {}).get(n)
                which = p.get("control", {}).get("kind", "random")
                lines.append(f"\nlayer {n}" + (f"  ({which} control's best rate difference: {chance:.4f})"
                                                if chance is not None else ""))
                lines.append(f"  {'feature':>8} {'rate':>7} {'base':>7} {'diff':>7} {'mean':>7} {'base':>7} {'texts':>6}  top context")
                for r in v["more_on_texts"]:
                    ctx = repr(snippet(r["contexts"][0])) if r.get("contexts") else ""
                    lines.append(f"  {r['feature']:>8} {r['rate']:7.4f} {r['rate_baseline']:7.4f} {r['rate_diff']:7.4f} "
                                 f"{r['mean']:7.3f} {r['mean_baseline']:7.3f} {r['text_rate']:6.2f}  {ctx}")
        lines.append(f"\nresults: {self.path}")
        return "\n".join(lines)


@holding_lock
def run_inspect(cfg: InspectConfig) -> InspectResult:
    texts = texts_of(cfg.texts, column=cfg.column, limit=cfg.limit, shared_data=cfg.shared_data)
    baseline = texts_of(cfg.baseline, column=cfg.column, limit=cfg.limit, shared_data=cfg.shared_data) if cfg.baseline else None
    scope = cfg.load_scope(cfg.layer_list())  # only the layers asked for: 64K SAEs are large
    store = store_for(cfg.sae, scope, cfg.store)
    out = cfg.output()
    if baseline is None:
        payload = {"mode": "inspect", "sae": cfg.sae, "by": cfg.by, "store": str(store.path) if store else None,
                   "texts": inspect_texts(scope, texts, cfg, store)}
    else:
        res = contrast(scope, texts, baseline, cfg, store)
        payload = {"mode": "contrast", "sae": cfg.sae, "texts": cfg.texts, "baseline": cfg.baseline, "rank": cfg.rank,
                   "store": str(store.path) if store else None, **res}
        control = cfg.load_control(scope.saes)
        if control is not None:
            payload["control"] = {"path": cfg.control, "kind": control_kind(control),
                                  "best_rate_diff": chance_contrast(contrast(Scope(scope.lm, control), texts, baseline, cfg))}
    atomic_write_json(out, payload)
    write_inspect_section(payload, out.with_name(f"report-section-{out.stem}.html"))
    return InspectResult(out, payload, cfg.by)


@dataclass(kw_only=True)
class BuildConfig(SAEOptions, LayersOption, StoreConfig):
    """`saescope features build`: one pass over a corpus recording every feature's statistics and top contexts."""

    browse_layers: str | list[int] | None = config_field(None, "layers in the report's feature browser (default: up to 3 "
                                                         "spread over the store)")
    out: str | None = config_field(None, "store folder (default: SAE/features)", output="folder")
    resume: bool = config_field(False, "continue an interrupted build from its last checkpoint")
    overwrite: bool = config_field(False, "rebuild a store that is already there")

    def browse_list(self) -> list[int] | None:
        return parse_layers(self.browse_layers, None) if self.browse_layers else None

    def writes_into(self) -> Path:
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).features


@dataclass
class BuildResult:
    path: Path
    store: FeatureStore
    section: Path

    def text(self) -> str:
        s = self.store
        lines = [f"feature store for {len(s.layers)} layers over {s.meta['tokens']} tokens: {self.path}"]
        for n in s.layers:
            freq = s.frequencies(n)
            median = float(freq[freq > 0].median()) if (freq > 0).any() else 0
            lines.append(f"  layer {n:>3}: {int((freq > 0).sum())} of {len(freq)} features fired; median frequency of those "
                         f"{median:.5f}")
        seconds, rss = s.meta["build"]["seconds"], s.meta["build"]["peak_rss_mb"]
        lines.append(f"{s.meta['tokens']} tokens in {seconds:.0f} s ({s.meta['tokens'] / seconds:.0f} tok/s), peak RSS {rss:.0f} MB")
        lines.append(f"feature store: {self.path}; report section: {self.section}")
        return "\n".join(lines)


@holding_lock
def run_build(cfg: BuildConfig) -> BuildResult:
    scope = cfg.load_scope(cfg.layer_list())
    if cfg.browse_list() and (outside := sorted(set(cfg.browse_list()) - set(scope.layers))):
        raise ParamError(f"{{}} {escape(str(cfg.browse_layers))}: layer {outside[0]} is not among the layers built ({scope.layers})",
                         "browse_layers")
    out = cfg.writes_into()
    sae_name = str(Path(cfg.sae).resolve()) if Path(cfg.sae).exists() else cfg.sae
    build_feature_store(scope.lm, scope.saes, out, cfg, sae_spec=sae_name, resume=cfg.resume, overwrite=cfg.overwrite)
    store = FeatureStore(out)
    return BuildResult(out, store, write_browser_section(store, cfg.browse_list()))


@dataclass(kw_only=True)
class ShowConfig(Config):
    """`saescope features show`: one feature: frequency, activation histogram, top contexts, logit lens, experts."""

    store: str = config_field(REQUIRED, "the feature store folder")
    layer: int = config_field(REQUIRED, "the layer", min=0)
    feature: int = config_field(REQUIRED, "the feature id", min=0)
    contexts: int = config_field(8, "top contexts shown", min=0)
    json: bool = config_field(False, "print the feature as JSON")


@dataclass
class ShowResult:
    info: dict
    as_json: bool
    layer: int
    feature: int

    def text(self) -> str:
        info = self.info
        if self.as_json:
            return json.dumps(info, ensure_ascii=False, indent=1)
        lines = [f"layer {self.layer} feature {self.feature}: fires on {info['frequency']:.5f} of tokens ({info['fire_count']}), "
                 f"mean activation {info['mean_activation']:.3f}, max {info['max_activation']:.3f}",
                 "promotes: " + " ".join(repr(t) for t, _ in info["promoted"]),
                 "suppresses: " + " ".join(repr(t) for t, _ in info["suppressed"])]
        if "experts" in info:
            dist = info["experts"]["distribution"]
            top = sorted(range(len(dist)), key=lambda e: -dist[e])[:4]
            lines.append(f"experts: entropy {info['experts']['entropy_bits']:.2f} of {info['experts']['max_entropy_bits']:.2f} "
                         "bits; " + ", ".join(f"e{e} {dist[e]:.2f} (lift {info['experts']['lift'][e]:.1f})" for e in top))
        lines += [f"  {c['activation']:7.2f}  {snippet(c, 100)!r}" for c in info["contexts"]]
        return "\n".join(lines)


def run_show(cfg: ShowConfig) -> ShowResult:
    return ShowResult(FeatureStore(cfg.store).feature(cfg.layer, cfg.feature, contexts=cfg.contexts), cfg.json, cfg.layer,
                      cfg.feature)


@dataclass(kw_only=True)
class ExpertsConfig(Config):
    """`saescope features experts`: in a store of an MoE model, per expert, the features most associated with it."""

    store: str = config_field(REQUIRED, "the feature store folder")
    layer: int = config_field(REQUIRED, "the layer", min=0)
    top: int = config_field(10, "features per expert", min=1)


@dataclass
class ExpertsResult:
    rows: list[dict] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(f"expert {row['expert']:>3} ({row['token_share']:.3f} of tokens): "
                         + ", ".join(f"f{r['feature']} x{r['lift']:.1f}" for r in row["features"]) for row in self.rows)


def run_experts(cfg: ExpertsConfig) -> ExpertsResult:
    store = FeatureStore(cfg.store)
    if not store.meta.get("moe"):
        raise SaescopeError(f"{cfg.store} was built on a dense model: it has no expert routing")
    return ExpertsResult(expert_features(store, store.check_layer(cfg.layer), top=cfg.top))


@dataclass(kw_only=True)
class BrowserConfig(LayersOption):
    """`saescope features browser`: (re)write the report's feature browser section from a store."""

    store: str = config_field(REQUIRED, "the feature store folder")
    out: str | None = config_field(None, "HTML fragment (default: STORE/report-section.html)", output="file")

    def writes_into(self) -> Path:
        return Path(self.out).parent if self.out else Path(self.store)


@dataclass
class BrowserResult:
    path: Path

    def text(self) -> str:
        return f"feature browser: {self.path}"


@holding_lock
def run_browser(cfg: BrowserConfig) -> BrowserResult:
    return BrowserResult(write_browser_section(FeatureStore(cfg.store), cfg.layer_list(), Path(cfg.out) if cfg.out else None))


@dataclass(kw_only=True)
class ServeConfig(SAEOptions, LayersOption):
    """`saescope serve`: the local web app: per-token features, feature cards, steering."""

    store: str | None = config_field(None, "feature store (default: SAE/features when present)")
    host: str = config_field("127.0.0.1", "the address to listen on")
    port: int = config_field(8000, "the port", min=0, max=65535)


def run_serve(cfg: ServeConfig) -> None:
    from saescope.apps.inspect.serve import serve

    scope = cfg.load_scope(cfg.layer_list())
    serve(scope, store=store_for(cfg.sae, scope, cfg.store), host=cfg.host, port=cfg.port)


@dataclass(kw_only=True)
class SteerConfig(SAEOptions):
    """`saescope steer`: generate with strength x decoder direction added at a layer, beside the unsteered output."""

    layer: int = config_field(REQUIRED, "the layer to steer at", min=0)
    feature: list[int] = config_field(REQUIRED, "feature id(s): 3 or 3,7", min=0)
    strength: list[float] = config_field(REQUIRED, "one strength for all, or one per feature: 8 or 8,-4")
    prompt: list[str] = config_field(REQUIRED, "a prompt; give it several times for several prompts", repeat=True)
    max_new_tokens: int = config_field(40, "tokens generated per prompt", min=1)
    temperature: float = config_field(0.0, "0 = greedy", min=0)
    chat: bool = config_field(False, "wrap the prompt in the model's chat template")
    out: str | None = config_field(None, "JSON results file", output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.features()
        for i, prompt in enumerate(self.prompt):
            if not prompt.strip():
                raise ParamError(f"{{}} {i + 1} is empty", "prompt")

    def features(self) -> dict[int, float]:
        """{feature: strength}."""
        return parse_features(",".join(map(str, self.feature)), ",".join(map(str, self.strength)))


@dataclass
class SteerResult:
    layer: int
    features: dict[int, float]
    norm: float
    results: list[dict]
    path: Path | None

    def text(self) -> str:
        label = ", ".join(f"{s:+g} x f{f}" for f, s in self.features.items())
        lines = [f"steering layer {self.layer} with {label} (median token norm at this layer on the prompts: {self.norm:.1f})"]
        for pair in self.results:
            lines.append(f"\nprompt:     {pair['prompt']!r}\nunsteered:  {pair['unsteered']!r}\nsteered:    {pair['steered']!r}")
        if self.path:
            lines.append(f"\nresults: {self.path}")
        return "\n".join(lines)


def run_steer(cfg: SteerConfig) -> SteerResult:
    features = cfg.features()
    scope = cfg.load_scope([cfg.layer])
    sae = scope.sae(cfg.layer)
    norm = typical_norm(scope.lm, cfg.layer, cfg.prompt)
    results = [steered_pair(scope.lm, sae, layer=cfg.layer, features=features, prompt=prompt, max_new_tokens=cfg.max_new_tokens,
                            chat=cfg.chat, temperature=cfg.temperature) for prompt in cfg.prompt]
    out = Path(cfg.out) if cfg.out else None
    if out:
        atomic_write_json(out, {"sae": cfg.sae, "layer": cfg.layer, "features": {str(f): s for f, s in features.items()},
                                "median_token_norm": norm, "results": results})
    return SteerResult(cfg.layer, features, norm, results, out)
