"""One self-contained HTML page per SAE run: training curves, the per-layer evaluation (beside the random
control when one was evaluated) and the trust checks. Everything is read from the JSON files the
commands write into the run folder; plots are inline PNGs, so the page fetches nothing.

    train.json, train_log.jsonl, train_summary.json   saescope train
    eval.json (with "control")                         saescope eval [--control R]
    quality.json                                       saescope quality [--control R]
    trust/stability*.json                              saescope stability, saescope train --seeds N
    trust/transfer*.json                               saescope transfer [--out trust/transfer-NAME.json]
    */report-section*.html                             HTML sections applications write into the run folder
                                                       (saescope redundancy report: redundancy/report-section.html)
"""

from __future__ import annotations

import datetime as dt
import html
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saescope.api.evaluate import MARGINS_RECORD, margin_words
from saescope.core.data.rows import iter_rows
from saescope.core.errors import SaescopeError
from saescope.core.files import atomic_write_bytes, read_json
from saescope.core.io.lock import holding_lock
from saescope.core.io.run_dir import RunDir
from saescope.core.models.builtin import DEFAULT_MODEL
from saescope.core.render import figure, html_table, png
from saescope.core.schema import REQUIRED, Config, Field, check_record, config_field

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:.9em}
.missing{color:#a60;font-style:italic}img{max-width:100%}code{background:#f4f4f4;padding:0 .3em}
"""


def _read(path: Path, top: dict[str, Field] | None = None, **rows: dict[str, Field]) -> dict | list | None:
    """An optional JSON (or JSONL) file, None when absent; checked against `top` and each list `rows[key]` against its
    record spec. What is corrupt or ill-typed raises SaescopeError, which _section turns into a note on the page."""
    if not path.is_file():
        return None
    if path.suffix == ".jsonl":
        return [row for _, row in iter_rows(path)]
    obj = read_json(path)
    if top is not None:
        check_record(obj, top, str(path))
        for key, spec in rows.items():
            for i, row in enumerate(obj.get(key) or []):
                check_record(row, spec, f"{path}: {key}[{i}]")
    return obj


def _section(what: Path, render: Callable[[], str], warned: set[str]) -> str:
    """One part of the page. The files behind it are optional, so a corrupt or ill-typed one skips this part with a
    note on the page and a warning, instead of costing the whole report; `warned` holds the problems this page has
    already warned about."""
    try:
        return render()
    except SaescopeError as exc:
        problem = str(exc)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:  # deeper than checked
        problem = f"{what}: unexpected content ({type(exc).__name__}: {exc})".replace("\n", " ")
    if problem not in warned:  # one file behind two sections (eval.json: evaluation and control) is said once
        warned.add(problem)
        warnings.warn(f"report: section skipped: {problem}", stacklevel=2)
    return f'<p class="missing">Section skipped: {html.escape(problem)}</p>'


_NUM = Field(float, nullable=True)  # NaN is a number here; null (no value) is shown as such
_EVAL_ROW = {"layer": Field(int), **{k: _NUM for k in ("fvu", "l0", "dead_frac", "dense_frac", "ce_clean", "ce_sae", "ce_zero",
                                                       "ce_recovered", "kl")}}
_EVAL = {"layers": Field(list), "control": Field(list, required=False, nullable=True)}
_TRAIN = {"model": Field(str, required=False, nullable=True)}
_SUMMARY = {"tokens": Field(int), "elapsed_s": Field(float), "tokens_per_s": Field(float)}
_STABILITY = {"a": Field(str), "b": Field(str), "layers": Field(dict), "control": Field(dict, required=False, nullable=True)}
_TRANSFER = {"source": Field(str), "target": Field(str), "layers": Field(list), "data": Field(str, required=False, nullable=True),
             "eval_source": Field(list, required=False, nullable=True), "eval_target": Field(list, required=False, nullable=True)}
_TRANSFER_ROW = {"layer": Field(int), "shifted": Field(list), **{f"{k}_{side}": _NUM for k in ("fvu", "l0", "dead_frac", "ce_recovered")
                                                                 for side in ("source", "target")}}


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">No {what} yet: run <code>{html.escape(command)}</code>.</p>'


def _training(run: RunDir) -> str:
    log, cfg = _read(run.train_log), _read(run.train_config, _TRAIN)
    summary = _read(run.train_summary, _SUMMARY)
    for i, row in enumerate(log or [], start=1):
        check_record(row, {"tokens": Field(float), "layers": Field(dict)}, f"{run.train_log} line {i}")
        for n, v in row["layers"].items():
            check_record(v, {"fvu": _NUM, "dead_frac": _NUM}, f"{run.train_log} line {i}: layers.{n}")
    if not log:
        return _missing("training log", "saescope train --out " + str(run.path))
    out = []
    if cfg:
        cfg = {**cfg, "model": cfg.get("model") or DEFAULT_MODEL}
        keys = ("model", "preset", "expansion", "k", "max_tokens", "batch_size", "ctx_len", "seed", "lr")
        out.append(html_table(["setting", "value"], [[k, cfg.get(k)] for k in keys if cfg.get(k) is not None]))
    if summary:
        out.append(f'<p class="note">{summary["tokens"]:,} tokens in {summary["elapsed_s"]:.0f} s '
                   f'({summary["tokens_per_s"]:.0f} tokens/s).</p>')
    fig, (ax, ax2) = figure(2)
    layers = sorted(log[-1]["layers"], key=int)
    cmap = __import__("matplotlib").colormaps["viridis"]
    for i, n in enumerate(layers):
        color = cmap(i / max(len(layers) - 1, 1))
        ax.plot([r["tokens"] for r in log], [r["layers"][n]["fvu"] for r in log], color=color, lw=1)
        ax2.plot([r["tokens"] for r in log], [r["layers"][n]["dead_frac"] for r in log], color=color, lw=1)
    ax.set(xlabel="tokens", ylabel="training FVU", title="FVU per layer (dark = early layers)")
    ax2.set(xlabel="tokens", ylabel="dead fraction", title="dead latents per layer")
    out.append(png(fig))
    return "\n".join(out)


def _evaluation(run: RunDir) -> str:
    ev = _read(run.eval, _EVAL, layers=_EVAL_ROW, control=_EVAL_ROW)
    if not ev:
        return _missing("evaluation", f"saescope eval --sae {run.path}")
    rows, control = ev["layers"], ev.get("control")
    layers = [r["layer"] for r in rows]
    fig, axes = figure(3)
    for ax, key, label in zip(axes, ("fvu", "ce_recovered", "kl"), ("FVU", "CE recovered", "KL (nats/token)")):
        ax.plot(layers, [r[key] for r in rows], "o-", ms=3, label="trained SAE")
        if control:
            ax.plot(layers, [r[key] for r in control], "s--", ms=3, color="gray", label="random control")
        ax.set(xlabel="layer", title=label)
    axes[0].legend()
    note = (f'<p class="note">{ev.get("n_tokens", "?")} held-out tokens of {html.escape(str(ev.get("data", "?")))}, '
            f'model {html.escape(str(ev.get("model", "?")))}. CE recovered = (CE zero-ablated - CE spliced) / '
            f'(CE zero-ablated - CE clean).</p>')
    if control:
        head = ["layer", "FVU", "FVU ctrl", "L0", "L0 ctrl", "dead", "dead ctrl", "CE rec", "CE rec ctrl", "KL", "KL ctrl"]
        table = html_table(head, [[r["layer"], r["fvu"], c["fvu"], r["l0"], c["l0"], r["dead_frac"], c["dead_frac"],
                               r["ce_recovered"], c["ce_recovered"], r["kl"], c["kl"]] for r, c in zip(rows, control)])
    else:
        head = ["layer", "FVU", "L0", "dead", "dense", "CE clean", "CE sae", "CE zero", "CE rec", "KL"]
        table = html_table(head, [[r["layer"], r["fvu"], r["l0"], r["dead_frac"], r["dense_frac"], r["ce_clean"], r["ce_sae"],
                               r["ce_zero"], r["ce_recovered"], r["kl"]] for r in rows])
    return note + png(fig) + table


def _stability(path: Path) -> str:
    st = _read(path, _STABILITY)
    layers = sorted(st["layers"], key=int)
    out = [f'<h3>Seed stability: {html.escape(st["a"])} vs {html.escape(st["b"])}</h3>',
           '<p class="note">Share of A\'s features with a partner in B above each threshold: best decoder cosine, '
           'one-to-one (greedy) decoder cosine, and best activation correlation on held-out tokens. '
           '"control" rows compare A with a random control: what matching gives by chance.</p>']
    rows = []
    for n in layers:
        for label, rep in (("B", st["layers"][n]), ("control", (st.get("control") or {}).get(n))):
            if rep is None:
                continue
            d, a = rep["decoder"], rep.get("activations")
            rows.append([n, label, *[d["max_cos_a_to_b"][t] for t in ("0.5", "0.7", "0.9")],
                         *[d["one_to_one"][t] for t in ("0.5", "0.7", "0.9")],
                         *([a["max_corr"][t] for t in ("0.5", "0.7", "0.9")] if a else ["-"] * 3)])
    out.append(html_table(["layer", "vs", "cos≥.5", "cos≥.7", "cos≥.9", "1:1≥.5", "1:1≥.7", "1:1≥.9", "corr≥.5", "corr≥.7",
                       "corr≥.9"], rows))
    moved = [(n, st["layers"][n].get("decoder_cos_to_init") or [None, None]) for n in layers]
    moved = [(n, a, b) for n, (a, b) in moved if a is not None or b is not None]
    if moved:
        out.append('<p class="note">Median cosine of decoder rows to their random initialisation (A, B): '
                   + ", ".join(f"layer {n}: {a if a is None else round(a, 3)}, {b if b is None else round(b, 3)}"
                               for n, a, b in moved)
                   + ". Near 1, the features are still mostly their initialisation and seeds cannot agree yet.</p>")
    if len(layers) > 1:
        fig, (ax,) = figure(1)
        for t in ("0.5", "0.7", "0.9"):
            ax.plot([int(n) for n in layers], [st["layers"][n]["decoder"]["one_to_one"][t] for n in layers], "o-", ms=3,
                    label=f"one-to-one cos ≥ {t}")
        ax.set(xlabel="layer", ylabel="share of features", ylim=(0, 1), title="matched features per layer")
        ax.legend()
        out.append(png(fig))
    n0 = layers[len(layers) // 2]
    unstable = st["layers"][n0]["unstable"][:10]
    if unstable:
        out.append(f"<p>Least stable live features at layer {n0}:</p>")
        out.append(html_table(list(unstable[0]), [list(u.values()) for u in unstable]))
    return "\n".join(out)


def _transfer(path: Path) -> str:
    tr = _read(path, _TRANSFER, layers=_TRANSFER_ROW)
    rows = tr["layers"]
    layers = [r["layer"] for r in rows]
    fig, axes = figure(2)
    for ax, key, label in zip(axes, ("fvu", "ce_recovered"), ("FVU", "CE recovered")):
        ax.plot(layers, [r[f"{key}_source"] for r in rows], "o-", ms=3, label=f"source: {tr['source']}")
        ax.plot(layers, [r[f"{key}_target"] for r in rows], "s--", ms=3, label=f"target: {tr['target']}")
        ax.set(xlabel="layer", title=label)
    axes[0].legend(fontsize=7)
    table = html_table(["layer", "FVU src", "FVU tgt", "L0 src", "L0 tgt", "dead src", "dead tgt", "CE rec src", "CE rec tgt",
                    "most shifted features (freq src → tgt)"],
                   [[r["layer"], r["fvu_source"], r["fvu_target"], r["l0_source"], r["l0_target"], r["dead_frac_source"],
                     r["dead_frac_target"], r["ce_recovered_source"], r["ce_recovered_target"],
                     ", ".join(f"{s['feature']} ({s['freq_source']:.3f}→{s['freq_target']:.3f})" for s in r["shifted"][:3])]
                    for r in rows])
    clean = [(e[0]["ce_clean"], f[0]["ce_clean"]) for e, f in [(tr.get("eval_source"), tr.get("eval_target"))] if e and f]
    moved = (f" Clean CE on this text: {clean[0][0]:.4f} (source), {clean[0][1]:.4f} (target), which says how far the "
             "target model itself has moved." if clean else "")
    return (f"<h3>Transfer: {html.escape(tr['source'])} → {html.escape(tr['target'])} ({html.escape(path.name)})</h3>"
            f'<p class="note">The same SAEs and held-out text ({html.escape(tr.get("data", "?"))}) on the model they were '
            "trained on and on another checkpoint."
            f"{moved}</p>" + png(fig) + table)


def _control(run: RunDir) -> str:
    ev = _read(run.eval, _EVAL, layers=_EVAL_ROW, control=_EVAL_ROW)
    if ev and ev.get("control"):
        gaps = [(r["layer"], r["fvu"], c["fvu"], r["ce_recovered"], c["ce_recovered"]) for r, c in zip(ev["layers"], ev["control"])]
        better = sum(1 for _, f, fc, ce, cec in gaps if f < fc and ce > cec)
        ce_ctl = sorted(c["ce_recovered"] for c in ev["control"])
        return (f"<h3>Random control</h3><p>The trained SAEs beat a random-direction control of the same shape and k "
                   f"on both FVU and CE recovered at {better} of {len(gaps)} layers (figures in the evaluation above). "
                   f"The control alone recovers {ce_ctl[0]:.2f} to {ce_ctl[-1]:.2f} of the CE: that much of any CE-recovered "
                   "figure comes from the zero-ablation baseline being far off, not from the SAE; compare KL and FVU "
                "with the control's before reading CE recovered.</p>")
    return "<h3>Random control</h3>" + _missing("control evaluation", f"saescope control random --like {run.path} --out "
                                                 f"{run.control} && saescope eval --sae {run.path} --control {run.control}")


_QUALITY = {"layers": Field(dict), "probing": Field(dict)}


def _quality(run: RunDir) -> str:
    q = _read(run.quality, _QUALITY)
    if not q:
        return _missing("quality measurement", f"saescope quality --sae {run.path} --control {run.control}")
    rows = q["layers"]
    for n, r in rows.items():
        check_record(r, {"sae_top1": _NUM, "sae_top5": _NUM, "dense": _NUM, "sae_fvu_in_domain": _NUM}, f"{run.quality}: layers.{n}")
    ctl = all("control_top1" in r for r in rows.values())
    head = ["layer", "top-1", *(["control top-1", "margin ± se"] if ctl else []), "top-5", *(["control top-5"] if ctl else []),
            "dense probe", "letter latents F1", *(["control"] if ctl else []), "absorption", "FVU in domain", "FVU maths",
            "FVU code", "FVU non-English", "decoder cos to init"]

    def value(r: dict, key: str):
        return r[key] if isinstance(r.get(key), float) else "-"

    def margin(r: dict) -> str:
        return f"{r['top1_margin']:+.3f} ± {r['top1_margin_se']:.3f}" if isinstance(r.get("top1_margin_se"), float) else "-"

    table = html_table(head, [[n, r["sae_top1"], *([r["control_top1"], margin(r)] if ctl else []), r["sae_top5"],
                               *([r["control_top5"]] if ctl else []), r["dense"], value(r, "sae_letter_main_f1"),
                               *([value(r, "control_letter_main_f1")] if ctl else []), value(r, "sae_absorption"),
                               r["sae_fvu_in_domain"], value(r, "sae_fvu_math"), value(r, "sae_fvu_code"),
                               value(r, "sae_fvu_multilingual"), value(r, "decoder_cos_to_init")]
                              for n, r in rows.items()])
    tasks = q["probing"].get("tasks", {})
    verdict = _probing_verdict(rows) if ctl else " No control was measured: without it these figures say nothing about learned features."
    letters = [(r["sae_letter_main_f1"], r["control_letter_main_f1"]) for r in rows.values()
               if isinstance(r.get("sae_letter_main_f1"), float) and isinstance(r.get("control_letter_main_f1"), float)]
    if ctl and letters:
        ahead = sum(a > b for a, b in letters)
        verdict += (f" On first letters (a token-level concept), each letter's main latents are a better probe than the "
                    f"control's at {ahead} of {len(letters)} layers (test F1 {sum(a for a, _ in letters) / len(letters):.3f} "
                    f"vs {sum(b for _, b in letters) / len(letters):.3f} on average).")
    return (f'<p class="note">Sparse probing (SAEBench): mean accuracy over {len(tasks)} real labelled tasks '
            f"({html.escape(', '.join(tasks))}; chance 0.5) of the best single latent (top-1) and of a logistic regression "
            "on the best 5, beside the random control and a dense probe on the residual stream (margin: top-1 minus the "
            "control's, paired over the same test texts); first-letter feature absorption (SAEBench): the test F1 of each "
            "letter's main latents used as a probe, and the mean absorption fraction (lower is better); FVU on held-out "
            f"corpus text and on maths, code and non-English prompts.{verdict}</p>" + table)


def _probing_verdict(rows: dict) -> str:
    """How the trained SAEs' top-1 compares with the control's, counting a layer as a win or a loss only beyond two
    standard errors of the difference: the paired se of the text-by-text differences where measured, else (files
    written before it) the two sides' binomial se combined."""
    diffs = [(r["top1_margin"], r["top1_margin_se"]) if isinstance(r.get("top1_margin_se"), float) else
             (r["sae_top1"] - r["control_top1"], math.hypot(r.get("sae_top1_se", 0.0), r.get("control_top1_se", 0.0)))
             for r in rows.values()]
    ahead = sum(d > 0 for d, _ in diffs)
    win = sum(d > 2 * se for d, se in diffs if se > 0)
    loss = sum(d < -2 * se for d, se in diffs if se > 0)
    mean_sae = sum(r["sae_top1"] for r in rows.values()) / len(rows)
    mean_ctl = sum(r["control_top1"] for r in rows.values()) / len(rows)
    plain = ("on sparse probing these SAEs are not yet distinguishable from random directions" if win < len(rows) / 2
             else "the trained latents carry these concepts better than random directions")
    return (f" Top-1, mean over layers: trained {mean_sae:.3f}, control {mean_ctl:.3f}; the trained SAEs are ahead at {ahead} "
            f"of {len(rows)} layers, by more than two standard errors at {win}, behind by more than two at {loss}: {plain}.")


def _earned(run: RunDir) -> str:
    """In words, per control: which figures the trained SAEs earn over it (more than two paired SEs), where the margin
    is nil and where they fall behind; from eval.json's and quality.json's margins (`--control` given repeatedly)."""
    found = []
    ev = _read(run.eval, _EVAL) or {}
    for entry in ev.get("margins") or []:
        check_record(entry, MARGINS_RECORD, f"{run.eval}: margins")
        said: dict[str, list[int]] = {}
        for m in entry["layers"]:
            for name, key in (("FVU", "fvu"), ("CE recovered", "ce_recovered"), ("CE recovered vs mean", "ce_recovered_mean")):
                said.setdefault(f"{name} {margin_words(m[key], m[f'{key}_se'])}", []).append(m["layer"])
        found.append((entry["kind"], entry["control"], said))
    quality = _read(run.quality) or {}
    for entry in quality.get("margins") or []:
        said = {}
        for n, m in entry["layers"].items():
            for name, key in (("probing top-1", "top1"), ("probing top-5", "top5")):
                said.setdefault(f"{name} {margin_words(m[key], m[f'{key}_se'])}", []).append(int(n))
        found.append((entry["kind"], entry["control"], said))
    if not found:
        return ("<h3>Margins over each control</h3>" + _missing("margin measurement", f"saescope eval --sae {run.path} "
                "--control RANDOM --control FROZEN_DECODER (saescope control frozen-decoder --like RUN --out ...)"))
    lines = []
    for kind, path, said in found:
        parts = [f"{what} at {len(layers)} layer{'s' if len(layers) != 1 else ''}" for what, layers in sorted(said.items())]
        said_text = html.escape("; ".join(parts))
        lines.append(f"<li>over the {html.escape(kind)} control (<code>{html.escape(path)}</code>): {said_text}</li>")
    return ("<h3>Margins over each control</h3><p>Earned: the trained SAEs ahead by more than two paired standard "
            "errors; nil: within two; below: behind by more than two.</p><ul>" + "".join(lines) + "</ul>")


def _trust(run: RunDir, warned: set[str]) -> str:
    out = [_section(run.eval, lambda: _control(run), warned), _section(run.eval, lambda: _earned(run), warned)]
    stab = sorted(run.trust.glob("stability*.json"))
    out += [_section(p, lambda p=p: _stability(p), warned) for p in stab] or ["<h3>Seed stability</h3>" + _missing(
        "stability check", f"saescope stability --sae {run.path} --sae OTHER_SEED_RUN")]
    out += [_section(p, lambda p=p: _transfer(p), warned) for p in sorted(run.trust.glob("transfer*.json"))] or [
        "<h3>Transfer</h3>" + _missing("transfer check", f"saescope transfer --sae {run.path} --model OTHER_CHECKPOINT")]
    return "\n".join(out)


def _html_part(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SaescopeError(f"cannot read {path}: not a UTF-8 HTML section ({exc})") from exc


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of the run folder RUN (default: RUN/report.html) and return its path."""
    run = RunDir(run)
    if not run.path.is_dir():
        raise SaescopeError(f"run folder not found: {run.path}")
    out = Path(out) if out else run.report
    warned: set[str] = set()
    try:
        cfg = _read(run.train_config, _TRAIN) or {}
    except SaescopeError:
        cfg = {}  # the training section says what is wrong with it
    title = f"saescope report: {run.path.name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f'<p class="note">Model {html.escape(str(cfg.get("model") or (DEFAULT_MODEL if cfg else "?")))}; written '
             f'{dt.datetime.now().strftime("%Y-%m-%d %H:%M")}. Data behind every figure: the JSON files in '
             f'{html.escape(str(run.path))}.</p>',
             "<h2>Training</h2>", _section(run.train_log, lambda: _training(run), warned),
             "<h2>Evaluation</h2>", _section(run.eval, lambda: _evaluation(run), warned),
             "<h2>Quality</h2>", _section(run.quality, lambda: _quality(run), warned), "<h2>Trust</h2>", _trust(run, warned),
             *[_section(p, lambda p=p: _html_part(p), warned) for p in sorted(run.path.glob("*/report-section*.html"))], "</body></html>"]
    atomic_write_bytes(out, "\n".join(parts).encode())
    return out


@dataclass(kw_only=True)
class ReportConfig(Config):
    """`saescope report`: a self-contained HTML page of a run: training, evaluation, quality, trust, applications."""

    sae: str = config_field(REQUIRED, "the run folder")
    out: str | None = config_field(None, "HTML file (default: SAE/report.html)", output="file")

    def writes_into(self) -> Path:
        return Path(self.out).parent if self.out else Path(self.sae)


@dataclass
class ReportResult:
    path: Path

    def text(self) -> str:
        return f"report: {self.path}"


@holding_lock
def run_report(cfg: ReportConfig) -> ReportResult:
    return ReportResult(build_report(cfg.sae, cfg.out))
