"""HTML for the report: the feature browser (data embedded as JSON, plain JS, no network) and the inspect and
contrast results, whose feature ids open the browser's card."""

from __future__ import annotations

import html
import json
from pathlib import Path

from saescope.api.store import FeatureStore
from saescope.core.files import atomic_write_bytes

BROWSER_CONTEXTS = 4
BROWSER_LEFT, BROWSER_RIGHT = 10, 3
BROWSER_LOGITS = 6

_JS = r"""
(function () {
  const D = JSON.parse(document.getElementById('sfb-data').textContent);
  const T = D.tokens, byLayer = {};
  for (const L of D.layers) { byLayer[L] = new Map(D.features[L].map(r => [r[0], r])); }
  const $ = id => document.getElementById(id);
  const esc = s => s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  const tok = i => i < 0 ? '' : T[i];
  const sel = $('sfb-layer');
  for (const L of D.layers) { const o = document.createElement('option'); o.value = L; o.textContent = 'layer ' + L; sel.appendChild(o); }
  function hist(h) {
    if (!h.length) return '';
    const max = Math.max(...h.map(b => b[1])), lo = h[0][0], hi = h[h.length - 1][0], w = 6;
    let bars = '';
    for (const [b, c] of h) {
      const x = (b - lo) * w, y = 60 * (1 - c / max);
      const tip = `<title>${D.edges[b]}-${D.edges[b + 1]}: ${c}</title>`;
      bars += `<rect x="${x}" y="${y}" width="${w - 1}" height="${60 - y}" fill="#4a78b5">${tip}</rect>`;
    }
    return `<svg class="sfb-hist" width="${(hi - lo + 1) * w}" height="62">${bars}</svg>` +
      `<div class="note">activation ${D.edges[lo]} to ${D.edges[hi + 1]} (log bins)</div>`;
  }
  function show(L, F) {
    L = String(L); const card = $('sfb-card');
    if (!byLayer[L]) { card.innerHTML = `<p>Layer ${esc(L)} is not in this browser (layers ${D.layers.join(', ')}).</p>`; return; }
    const r = byLayer[L].get(Number(F));
    if (!r) {
      card.innerHTML = Number(F) >= 0 && Number(F) < D.d_sae[L]
        ? `<p>Layer ${L} feature ${F} never fired on the ${D.n_tokens[L]} tokens of the store.</p>`
        : `<p>No feature ${esc(String(F))}: layer ${L} has features 0..${D.d_sae[L] - 1}.</p>`;
      return;
    }
    const [id, freq, mean, max, h, ctx, up, down] = r;
    let out = `<h3 id="sfb-title">Layer ${L} feature ${id}</h3><p>fires on <b>${(100 * freq).toPrecision(3)}%</b> of tokens; ` +
      `mean activation ${mean.toFixed(3)}, max ${max.toFixed(3)}</p>` + hist(h) + '<h4>Top contexts</h4><ol class="sfb-ctx">';
    for (const [a, toks] of ctx) {
      const parts = toks.map((t, i) => i === D.mark ? `<mark>${esc(tok(t))}</mark>` : esc(tok(t)));
      out += `<li><span class="act">${a.toFixed(2)}</span> ${parts.join('')}</li>`;
    }
    out += '</ol><p><b>Promotes</b> ' + up.map(t => `<code>${esc(tok(t))}</code>`).join(' ') +
      '<br><b>Suppresses</b> ' + down.map(t => `<code>${esc(tok(t))}</code>`).join(' ') + '</p>';
    if (r[8]) {
      const shares = r[8].map((s, e) => s > 0.05 ? `e${e} ${s.toFixed(2)}` : '').filter(Boolean);
      out += '<p><b>Experts</b> (share of its routings) ' + shares.join(', ') + '</p>';
    }
    card.innerHTML = out;
    sel.value = L;
  }
  function search() {
    const q = $('sfb-q').value.trim(), L = sel.value, list = $('sfb-results');
    list.innerHTML = '';
    let m;
    if ((m = q.match(/^(\d+)\s*[:/]\s*(\d+)$/))) { show(m[1], m[2]); return; }
    if (/^\d+$/.test(q)) { show(L, q); return; }
    if (!q) return;
    const needle = q.toLowerCase(), hits = [];
    for (const r of byLayer[L].values()) {
      let score = 0;
      for (const [, toks] of r[5]) if (tok(toks[D.mark]).trim().toLowerCase() === needle.trim()) score += 2;
      for (const t of r[6]) if (tok(t).trim().toLowerCase() === needle.trim()) score += 1;
      if (score) hits.push([score, r[0]]);
    }
    hits.sort((a, b) => b[0] - a[0]);
    list.innerHTML = hits.length ? `<p>${hits.length} features of layer ${L} fire on or promote "${esc(q)}":</p>` +
      hits.slice(0, 60).map(([s, f]) => `<a href="#sfb" class="sfb-hit" data-l="${L}" data-f="${f}">${f}</a>`).join(' ')
      : `<p>No feature of layer ${L} has "${esc(q)}" as the top token of a context or a promoted token.</p>`;
    if (hits.length) show(L, hits[0][1]);
  }
  $('sfb-go').addEventListener('click', search);
  $('sfb-q').addEventListener('keydown', e => { if (e.key === 'Enter') search(); });
  document.addEventListener('click', e => {
    const a = e.target.closest('[data-f]');
    if (a) { e.preventDefault(); show(a.dataset.l, a.dataset.f); document.getElementById('sfb').scrollIntoView(); }
  });
  window.saescopeShow = show;
  const first = D.layers[0];
  if (D.features[first].length) show(first, D.features[first][0][0]);
})();
"""

_CSS = """
#sfb .sfb-bar{display:flex;gap:.5em;align-items:center;margin:.5em 0}
#sfb-card{border:1px solid #ccc;border-radius:6px;padding:.2em 1em;margin-top:.6em;max-width:60em}
.sfb-ctx li{font-family:monospace;white-space:pre-wrap;margin:.25em 0}
.sfb-ctx mark{background:#ffd27a;font-weight:bold}.sfb-ctx .act{color:#666;margin-right:.6em}
.sfb-hit{margin-right:.4em}
"""


def _default_layers(layers: list[int]) -> list[int]:
    if len(layers) <= 3:
        return layers
    return sorted({layers[0], layers[len(layers) // 2], layers[-1]})


def browser_data(store: FeatureStore, layers: list[int]) -> dict:
    """The compact data the browser's JS reads: per layer, one row per feature that fired, tokens by index."""
    table: dict[int, int] = {}

    def ti(token_id: int) -> int:
        if token_id < 0:
            return -1
        return table.setdefault(token_id, len(table))

    left = store.left
    lo, hi = max(0, left - BROWSER_LEFT), left + BROWSER_RIGHT + 1
    features: dict[str, list] = {}
    for n in layers:
        get = lambda name: store.tensor(n, name)  # noqa: E731
        count, act_sum, hist = get("fire_count"), get("act_sum"), get("hist")
        acts, windows = get("top_acts")[:, :BROWSER_CONTEXTS], get("top_tokens")[:, :BROWSER_CONTEXTS, lo:hi]
        up, down = get("logit_top_ids")[:, :BROWSER_LOGITS], get("logit_bottom_ids")[:, :BROWSER_LOGITS]
        experts = get("expert_counts") if store.meta.get("moe") else None
        freq = store.frequencies(n)
        rows = []
        for f in (count > 0).nonzero()[:, 0].tolist():
            c = int(count[f])
            row = [f, round(float(freq[f]), 7), round(float(act_sum[f]) / c, 4), round(float(acts[f, 0]), 4),
                   [[b, int(v)] for b, v in enumerate(hist[f].tolist()) if v],
                   [[round(float(a), 3), [ti(int(t)) for t in w]] for a, w in zip(acts[f], windows[f]) if a > 0],
                   [ti(int(t)) for t in up[f]], [ti(int(t)) for t in down[f]]]
            if experts is not None:
                e = experts[f].double()
                row.append([round(float(x), 3) for x in (e / e.sum().clamp(min=1))])
            rows.append(row)
        features[str(n)] = rows
    tokens = [store.token(t) for t in sorted(table, key=table.get)]
    return {"store": str(store.path), "model": store.meta.get("model"), "layers": [str(n) for n in layers],
            "d_sae": {str(n): store.d_sae(n) for n in layers}, "n_tokens": {str(n): store.n_tokens(n) for n in layers},
            "edges": store.meta["hist_edges"], "mark": left - lo, "tokens": tokens, "features": features}


def browser_html(store: FeatureStore, layers: list[int] | None = None) -> str:
    layers = [store.check_layer(n) for n in layers] if layers else _default_layers(store.layers)
    data = json.dumps(browser_data(store, layers), ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    left_out = [n for n in store.layers if n not in layers]
    note = (f" Layers {', '.join(map(str, left_out))} are in the store but not here (add them with saescope features "
            f"browser --layers); saescope features show reads any of them.") if left_out else ""
    return (f'<h2 id="sfb">Feature browser</h2><style>{_CSS}</style>'
            f'<p class="note">From the feature store {html.escape(str(store.path))}: {store.meta["tokens"]} tokens of '
            f'{html.escape(str(store.meta["config"].get("data") or "the embedded corpus"))}, top {BROWSER_CONTEXTS} contexts per '
            f'feature (the token where the feature peaked is highlighted). Search a feature id (or LAYER:ID) or a token.{note}</p>'
            '<div class="sfb-bar"><select id="sfb-layer"></select>'
            '<input id="sfb-q" size="30" placeholder="feature id, 15:3379, or a token">'
            '<button id="sfb-go">Search</button></div><div id="sfb-results"></div><div id="sfb-card"></div>'
            f'<script type="application/json" id="sfb-data">{data}</script><script>{_JS}</script>')


def write_browser_section(store: FeatureStore, layers: list[int] | None = None, out: Path | None = None) -> Path:
    out = out or store.path / "report-section.html"
    atomic_write_bytes(out, browser_html(store, layers).encode())
    return out


def _fid(layer: int | str, feature: int) -> str:
    return f'<a href="#sfb" data-l="{layer}" data-f="{feature}">{feature}</a>'


def inspect_html(payload: dict) -> str:
    if payload["mode"] == "contrast":
        parts = [f"<h2>Contrast: {html.escape(str(payload['texts']))} vs {html.escape(str(payload['baseline']))}</h2>",
                 f'<p class="note">{payload["n_texts"]} texts against {payload["n_baseline"]}; features ranked by the '
                 + ("difference of their mean activation per token" if payload.get("rank") == "mean" else
                    "difference of the share of tokens they fire on") + ". Click a feature for its card in the browser.</p>"]
        chance = (payload.get("control") or {}).get("best_rate_diff", {})
        for n, v in payload["layers"].items():
            head = f"<h3>Layer {n}</h3>"
            c = chance.get(n, chance.get(str(n)))
            if c is not None:
                which = html.escape(str((payload.get("control") or {}).get("kind", "random")))
                head += f'<p class="note">Control ({which}): best rate difference {c:.4f}.</p>'
            rows = "".join(f"<tr><td>{_fid(n, r['feature'])}</td><td>{r['rate']:.4f}</td><td>{r['rate_baseline']:.4f}</td>"
                           f"<td>{r['rate_diff']:.4f}</td><td>{r['mean']:.3f}</td><td>{r['mean_baseline']:.3f}</td>"
                           f"<td>{r['text_rate']:.2f}</td><td>{r['text_rate_baseline']:.2f}</td></tr>" for r in v["more_on_texts"])
            parts.append(head + "<table><tr><th>feature</th><th>rate</th><th>baseline rate</th><th>difference</th><th>mean act.</th>"
                         f"<th>baseline mean</th><th>texts</th><th>baseline texts</th></tr>{rows}</table>")
        return "\n".join(parts)
    parts = ["<h2>Inspected texts</h2>", f'<p class="note">Top features per layer by {payload["by"]} activation over '
             "each text's tokens (the first token, the attention sink, left out). Click a feature for its card.</p>"]
    for entry in payload["texts"]:
        parts.append(f"<h3>{html.escape(entry['text'][:160])}</h3>")
        for n, rows in entry["layers"].items():
            cells = ", ".join(f"{_fid(n, r['feature'])} ({r['score']:.1f}; "
                              f"{html.escape(', '.join(repr(t) for _, t, _ in sorted(r['fired_on'], key=lambda x: -x[2])[:2]))})"
                              for r in rows)
            parts.append(f"<p><b>L{n}</b>: {cells}</p>")
    return "\n".join(parts)


def write_inspect_section(payload: dict, out: Path) -> Path:
    atomic_write_bytes(out, inspect_html(payload).encode())
    return out
