"""`saescope serve`: a local web app over one Scope (and its feature store, when there is one).

    GET  /                        the page (plain HTML and JS, no network assets)
    GET  /api/info                model, layers, features per layer, limits
    POST /api/encode              {"text", "layers"?, "top"?} -> tokens and, per layer and token, the top features
    GET  /api/feature/L/F         the feature's card: store statistics and contexts, or the live logit lens alone
    POST /api/steer               {"prompt", "layer", "features": {id: strength}, "max_new_tokens"?}

Bad requests get 4xx JSON {"error": "..."} (400 malformed, 404 unknown layer or feature, 413 too long, 422 wrong
values) and the server goes on. One lock serialises model calls: steering hooks the shared model, and an encode
running meanwhile must not be steered.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from saescope.api.scope import Scope
from saescope.api.steer import steered_pair
from saescope.api.store import FeatureStore, logit_lens
from saescope.core.errors import SaescopeError
from saescope.core.models import token_strings

MAX_CHARS = 8000
MAX_TOKENS = 512
MAX_NEW_TOKENS = 64
PAGE = Path(__file__).with_name("serve_page.html")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _number(body: dict, key: str, kind: type, default=None, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        raise HTTPError(422, f"missing {key!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise HTTPError(422, f"{key!r} must be an integer")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise HTTPError(422, f"{key!r} must be a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HTTPError(422, f"{key!r} must be between {lo} and {hi}")
    return value


def _text(body: dict, key: str) -> str:
    text = body.get(key)
    if not isinstance(text, str) or not text.strip():
        raise HTTPError(422, f"{key!r} must be a non-empty string")
    if len(text) > MAX_CHARS:
        raise HTTPError(413, f"{key!r} has {len(text)} characters; the limit is {MAX_CHARS}")
    return text


class App:
    def __init__(self, scope: Scope, store: FeatureStore | None = None):
        self.scope, self.store, self.lock = scope, store, threading.Lock()

    def _layer(self, value) -> int:
        try:
            layer = int(value)
        except (TypeError, ValueError):
            raise HTTPError(422, f"layer must be an integer, got {value!r}") from None
        if layer not in self.scope.saes:
            raise HTTPError(404, f"no SAE for layer {layer} (layers: {', '.join(map(str, self.scope.layers))})")
        return layer

    def _feature(self, layer: int, value) -> int:
        try:
            feature = int(value)
        except (TypeError, ValueError):
            raise HTTPError(422, f"feature must be an integer, got {value!r}") from None
        d = self.scope.saes[layer].cfg.d_sae
        if not 0 <= feature < d:
            raise HTTPError(404, f"feature {feature} does not exist: layer {layer} has features 0..{d - 1}")
        return feature

    def info(self) -> dict:
        s = self.scope
        return {"model": s.lm.name, "layers": s.layers, "d_sae": {n: s.saes[n].cfg.d_sae for n in s.layers},
                "store": str(self.store.path) if self.store else None, "limits": {"chars": MAX_CHARS, "tokens": MAX_TOKENS,
                                                                                  "new_tokens": MAX_NEW_TOKENS}}

    def encode(self, body: dict) -> dict:
        text = _text(body, "text")
        layers = [self._layer(n) for n in body.get("layers") or self.scope.layers]
        top = _number(body, "top", int, 5, 1, 20)
        n_tok = len(self.scope.lm.tokenizer(text)["input_ids"])
        if n_tok > MAX_TOKENS:
            raise HTTPError(413, f"the text has {n_tok} tokens; the limit is {MAX_TOKENS}")
        with self.lock:
            codes = self.scope.encode([text], layers=layers, progress=False, max_length=MAX_TOKENS)[0]
        per_layer = {}
        for n in layers:
            c = codes.layers[n]
            order = c.values.argsort(dim=1, descending=True)[:, :top]
            idx, val = c.indices.gather(1, order), c.values.gather(1, order)
            per_layer[n] = [[[int(i), round(float(v), 3)] for i, v in zip(ri, rv) if v > 0] for ri, rv in zip(idx, val)]
        return {"tokens": codes.tokens, "layers": per_layer}

    def feature(self, layer, feature) -> dict:
        layer = self._layer(layer)
        feature = self._feature(layer, feature)
        if self.store is not None and layer in self.store.layers:
            return {"source": "store", **self.store.feature(layer, feature, contexts=8)}
        with self.lock:
            up_ids, up, down_ids, down = (t[0].tolist() for t in logit_lens(self.scope.lm.model,
                                                                          self.scope.saes[layer].W_dec[feature][None], 10))
        tok = self.scope.lm.tokenizer
        return {"source": "decoder", "layer": layer, "feature": feature, "contexts": [],
                "promoted": [list(p) for p in zip(token_strings(tok, up_ids), up)],
                "suppressed": [list(p) for p in zip(token_strings(tok, down_ids), down)]}

    def steer(self, body: dict) -> dict:
        prompt = _text(body, "prompt")
        layer = self._layer(body.get("layer"))
        raw = body.get("features")
        if not isinstance(raw, dict) or not raw:
            raise HTTPError(422, "'features' must be an object {feature id: strength}")
        features = {}
        for f, strength in raw.items():
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
                raise HTTPError(422, f"the strength of feature {f} must be a finite number")  # json.loads reads NaN
            features[self._feature(layer, f)] = float(strength)
        new = _number(body, "max_new_tokens", int, 30, 1, MAX_NEW_TOKENS)
        with self.lock:
            pair = steered_pair(self.scope.lm, self.scope.saes[layer], layer=layer, features=features, prompt=prompt,
                                max_new_tokens=new)
        return {**pair, "layer": layer, "features": features}


def create_app(scope: Scope, store: FeatureStore | None = None) -> Starlette:
    app = App(scope, store)

    def endpoint(fn, *, body: bool):
        async def handle(request: Request):
            try:
                if body:
                    raw = await request.body()
                    if len(raw) > 4 * MAX_CHARS + 4096:
                        raise HTTPError(413, f"request body of {len(raw)} bytes is too large")
                    try:
                        payload = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise HTTPError(400, "the request body is not valid JSON") from None
                    if not isinstance(payload, dict):
                        raise HTTPError(400, "the request body must be a JSON object")
                    result = await run_in_threadpool(fn, payload)
                else:
                    result = await run_in_threadpool(fn, **request.path_params)
                return JSONResponse(result)
            except HTTPError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            except SaescopeError as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)

        return handle

    async def page(_request: Request):
        return HTMLResponse(PAGE.read_text())

    routes = [Route("/", page), Route("/api/info", endpoint(lambda: app.info(), body=False)),
              Route("/api/encode", endpoint(app.encode, body=True), methods=["POST"]),
              Route("/api/feature/{layer}/{feature}", endpoint(app.feature, body=False)),
              Route("/api/steer", endpoint(app.steer, body=True), methods=["POST"])]
    return Starlette(routes=routes)


def serve(scope: Scope, *, store: FeatureStore | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    print(f"saescope serve: http://{host}:{port}/  ({scope.lm.name}, layers {scope.layers[0]}..{scope.layers[-1]}"
          f"{', store ' + str(store.path) if store else ', no feature store'})", flush=True)
    uvicorn.run(create_app(scope, store), host=host, port=port, log_level="warning")
