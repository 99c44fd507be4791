"""`saescope serve`: a local web app over one Scope (and its feature store, when there is one).

    GET  /                        the page (plain HTML and JS, no network assets)
    GET  /api/info                model, layers, features per layer, limits
    POST /api/encode              {"text", "layers"?, "top"?} -> tokens and, per layer and token, the top features
    GET  /api/feature/L/F         the feature's card: store statistics and contexts, or the live logit lens alone
    POST /api/steer               {"prompt", "layer", "features": {id: strength}, "max_new_tokens"?}

Each body is one typed request (EncodeRequest, SteerRequest: saescope.core.schema.Config, strict types: no bool for an
int, no float for an int, no object for a list, no unknown field), read as a stream and refused at MAX_BODY bytes (not
after reading it), and parsed only when its nesting is at most MAX_DEPTH deep. Bad requests get 4xx JSON
{"error": "..."} with one line (400 malformed, 404 unknown layer or feature, 413 too large, 422 wrong values), never a
500, and the server goes on. One lock serialises model calls: steering hooks the shared model, and an encode running
meanwhile must not be steered.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import MISSING, dataclass, fields
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
from saescope.core.schema import REQUIRED, Config, config_field

MAX_CHARS = 8000
MAX_TOKENS = 512
MAX_NEW_TOKENS = 64
PAGE = Path(__file__).with_name("serve_page.html")
LOG = logging.getLogger("saescope.serve")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


MAX_BODY = 4 * MAX_CHARS + 4096  # bytes: the longest text, JSON-escaped, and the other fields
MAX_DEPTH = 8  # nesting of a request body (the deepest valid one, steer's features, is 2)


@dataclass(kw_only=True)
class EncodeRequest(Config):
    """POST /api/encode."""

    text: str = config_field(REQUIRED, "the text")
    layers: list[int] | None = config_field(None, "the layers to show (default: all)", min=0)
    top: int = config_field(5, "features per token", min=1, max=20)


@dataclass(kw_only=True)
class SteerRequest(Config):
    """POST /api/steer."""

    prompt: str = config_field(REQUIRED, "the prompt")
    layer: int = config_field(REQUIRED, "the layer to steer at", min=0)
    features: dict[str, float] = config_field(REQUIRED, "{feature id: strength}")
    max_new_tokens: int = config_field(30, "tokens generated", min=1, max=MAX_NEW_TOKENS)


def typed(cls: type, payload: object):
    """The request dataclass `cls` from a parsed JSON body, or an HTTPError saying in one line what is wrong."""
    if not isinstance(payload, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(payload) - set(names))
    if unknown:
        raise HTTPError(422, f"unknown field {unknown[0][:40]!r} (fields: {', '.join(names)})")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in payload]
    if missing:
        raise HTTPError(422, f"missing field {missing[0]!r}")
    try:
        return cls(**payload)
    except SaescopeError as exc:
        raise HTTPError(422, str(exc)[:300]) from None


def nesting(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count), read in one pass
    before parsing: json's own parser recurses and fails on deep input with RecursionError."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> object:
    if nesting(raw) > MAX_DEPTH:
        raise HTTPError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError, and so is NaN/Infinity
        raise HTTPError(400, "the request body is not valid JSON") from None


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, read as a stream and refused at `limit` bytes: a declared length over it at once, else at the chunk
    that crosses it (nothing more is read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit() and len(declared) <= 18):
            raise HTTPError(400, "bad Content-Length")
        if int(declared) > limit:
            raise HTTPError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _whole_number(text: str, what: str) -> int:
    """An id written in a URL path or as a JSON key: ASCII digits, at most 12 of them."""
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise HTTPError(422, f"{what} must be an integer, got {text[:40]!r}")
    return int(text)


def _text(text: str, key: str) -> str:
    if not text.strip():
        raise HTTPError(422, f"{key!r} must be a non-empty string")
    if len(text) > MAX_CHARS:
        raise HTTPError(413, f"{key!r} has {len(text)} characters; the limit is {MAX_CHARS}")
    return text


class App:
    def __init__(self, scope: Scope, store: FeatureStore | None = None):
        self.scope, self.store, self.lock = scope, store, threading.Lock()

    def _layer(self, value: int | str) -> int:
        """A layer of a typed request (an int), or of a URL path (digits only)."""
        layer = _whole_number(value, "layer") if isinstance(value, str) else value
        if layer not in self.scope.saes:
            raise HTTPError(404, f"no SAE for layer {layer} (layers: {', '.join(map(str, self.scope.layers))})")
        return layer

    def _feature(self, layer: int, value: str) -> int:
        """A feature id of a URL path or of steer's features object (keys are strings): digits only."""
        feature = _whole_number(value, "feature")
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
        req = typed(EncodeRequest, body)
        text = _text(req.text, "text")
        layers = [self._layer(n) for n in req.layers or self.scope.layers]
        top = req.top
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
        req = typed(SteerRequest, body)
        prompt = _text(req.prompt, "prompt")
        layer = self._layer(req.layer)
        if not req.features or len(req.features) > 16:
            raise HTTPError(422, "'features' must be an object of 1 to 16 {feature id: strength}")
        features = {self._feature(layer, f): float(strength) for f, strength in req.features.items()}
        new = req.max_new_tokens
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
                    result = await run_in_threadpool(fn, parse_body(await read_body(request)))
                else:
                    result = await run_in_threadpool(fn, **request.path_params)
                return JSONResponse(result)
            except HTTPError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            except SaescopeError as exc:
                return JSONResponse({"error": str(exc).splitlines()[0][:300]}, status_code=422)
            except Exception as exc:  # a bug, not a bad request: one line in the log and in the answer, no traceback
                line = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                LOG.error("saescope serve: %s %s: unexpected %s", request.method, request.url.path, line)
                return JSONResponse({"error": f"internal error ({line})"}, status_code=500)

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
