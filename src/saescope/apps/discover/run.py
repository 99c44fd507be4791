"""`saescope discover`: the SAE features of a behaviour (repetition, or a language), ranked by the contrast nu and
checked by steering both ways beside the control's directions of the same feature ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saescope.api.controls import ControlOption, make_controls
from saescope.api.scope import SAEOptions
from saescope.api.steer import typical_norm
from saescope.apps.discover.features import (
    RankedFeature,
    SteerCheck,
    degenerate_responses,
    language_features,
    repetition_features,
    verify_features,
)
from saescope.core.data import iter_texts
from saescope.core.data.benchmarks import SharedDataOption, mgsm_questions
from saescope.core.data.responses import train_prompts
from saescope.core.errors import ParamError
from saescope.core.files import atomic_write_json, record_path
from saescope.core.io import RunDir
from saescope.core.io.lock import holding_lock
from saescope.core.schema import REQUIRED, config_field, escape


@dataclass(kw_only=True)
class DiscoverConfig(SAEOptions, ControlOption, SharedDataOption):
    """`saescope discover`: rank the SAE features of a behaviour and check them by steering both ways."""

    layer: int = config_field(REQUIRED, "the layer", min=0)
    behaviour: str = config_field(REQUIRED, "repetition, or language:LANG (an MGSM language: en fr es de ja ...)")
    texts: str | None = config_field(None, "repetition: a file of degenerate texts (default: the real looping M-IFEval "
                                     "answers of the shared data, train side)")
    text_column: str = config_field("text", "for tables and JSON: the text column")
    top: int = config_field(10, "features to rank", min=1)
    select: int = config_field(3, "how many of the top features `sasft --features FILE` uses", min=1)
    verify: int = config_field(24, "prompts to steer on (0: skip the steering check)", min=0)
    strength: float | None = config_field(None, "steering strength (default: the layer's median token norm)")
    max_new_tokens: int = config_field(96, "tokens generated per prompt", min=1)
    out: str | None = config_field(None, "features file (default: SAE/behaviour/<behaviour>-layer<L>.json)", output="file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.behaviour != "repetition" and not self.behaviour.startswith("language:"):
            raise ParamError(f"{{}} {escape(repr(self.behaviour))}: use repetition or language:LANG", "behaviour")
        if self.select > self.top:
            raise ParamError(f"{{}} {self.select} exceeds {{}} {self.top}", "select", "top")

    @property
    def language(self) -> str | None:
        return self.behaviour.split(":", 1)[1] if self.behaviour.startswith("language:") else None

    def output(self) -> Path:
        name = f"{self.behaviour.replace(':', '-')}-layer{self.layer}.json"
        return Path(self.out) if self.out else RunDir.of_sae(self.sae).behaviour / name

    def writes_into(self) -> Path:
        return self.output().parent


@dataclass
class DiscoverResult:
    path: Path
    doc: dict
    ranked: list[RankedFeature]
    checks: list[SteerCheck] = field(default_factory=list)
    strength: float | None = None
    how: str = ""

    def text(self) -> str:
        d, language = self.doc, self.doc["behaviour"].removeprefix("language:") if ":" in self.doc["behaviour"] else None
        lines = [f"layer {d['layer']}, {d['behaviour']}: top features by nu ({d['source']}, {d['n_texts']} texts)",
                 f"{'feature':>8} {'nu':>8} {'fires on':>9} {'fires off':>9}"]
        lines += [f"{r.feature:>8} {r.nu:>8.3f} {r.rate_on:>9.2f} {r.rate_off:>9.2f}" for r in self.ranked]
        if self.checks:
            lines.append(f"steering check: strength +-{self.strength:.1f} ({self.how}), features {d['selected']} beside the "
                         "control's directions of the same ids")
            for c in self.checks:
                rate = f" {language} {c.stats.language_rate:.2f}" if language else ""
                lines.append(f"  {c.direction:>14} {c.strength:>+7.1f}: loop {c.stats.loop_rate:.2f} distinct-2 "
                             f"{c.stats.distinct_2:.2f}{rate}")
        lines.append(f"wrote {self.path} (selected: {d['selected']})")
        return "\n".join(lines)


@holding_lock
def run_discover(cfg: DiscoverConfig) -> DiscoverResult:
    scope = cfg.load_scope([cfg.layer])
    language = cfg.language
    if language:
        qs = mgsm_questions(cfg.shared_data)
        if language not in qs:
            raise ParamError(f"{{}}: language {escape(repr(language))} is not in MGSM (have {', '.join(sorted(qs))})", "behaviour")
        ranked = language_features(scope, cfg.layer, {lang: q[:200] for lang, q in qs.items()}, language, top=cfg.top)
        source, n_source = "MGSM problems 0-199, 11 languages", 200 * len(qs)
        prompts = qs[language][200 : 200 + cfg.verify]
    else:
        texts = (list(iter_texts(cfg.texts, text_column=cfg.text_column, split="all")) if cfg.texts
                 else degenerate_responses("en", shared_data=cfg.shared_data))
        ranked, _ = repetition_features(scope, cfg.layer, texts, top=cfg.top)
        source, n_source = cfg.texts or "looping M-IFEval answers (train side)", len(texts)
        prompts = train_prompts("en", limit=cfg.verify, shared_data=cfg.shared_data)
    selected = [r.feature for r in ranked[: cfg.select]]
    checks, strength, how = [], None, ""
    if cfg.verify:
        strength = cfg.strength or typical_norm(scope.lm, cfg.layer, prompts[:8])
        how = "as given" if cfg.strength else "the layer's median token norm, the default"
        sae = {cfg.layer: scope.sae(cfg.layer)}
        control = (cfg.load_control(sae) or make_controls(sae))[cfg.layer]
        checks = verify_features(scope, cfg.layer, selected, prompts, strengths=(-strength, strength), control=control,
                                 max_new_tokens=cfg.max_new_tokens, language=language)
    out = cfg.output()
    doc = {"behaviour": cfg.behaviour, "layer": cfg.layer, "sae": record_path(str(cfg.sae), out), "model": scope.lm.name, "source": source,
           "n_texts": n_source, "ranked": [r.to_dict() for r in ranked], "selected": selected,
           "control": cfg.control or "random (seed 0, in memory)", "steering_check": [c.to_dict() for c in checks]}
    atomic_write_json(out, doc)
    return DiscoverResult(out, doc, ranked, checks, strength, how)
