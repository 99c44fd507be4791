"""Hostile requests to `saescope serve`, each with the status and the fragment of the one-line error it must get: what
tests/inspect/test_serve.py sends one by one and concurrently, and bench/serve_load.py sends at scale."""

from saescope.apps.inspect.serve import MAX_CHARS

BAD_REQUESTS = [  # (method, path, body: bytes or JSON, status, fragment of the one-line error)
    ("POST", "/api/encode", b"{not json", 400, "not valid JSON"),
    ("POST", "/api/encode", ["a list"], 400, "must be a JSON object"),
    ("POST", "/api/encode", {"text": ""}, 422, "non-empty string"),
    ("POST", "/api/encode", {"text": "x" * (MAX_CHARS + 1)}, 413, "the limit is"),
    ("POST", "/api/encode", {"text": " nine" * 1000}, 413, "tokens; the limit is 512"),
    ("POST", "/api/encode", {"text": "hi", "layers": [7]}, 404, "no SAE for layer 7"),
    ("POST", "/api/encode", {"text": "hi", "layers": 15}, 422, "layers must be a list of integers"),
    ("POST", "/api/encode", {"text": "hi", "layers": {"15": 1}}, 422, "layers must be a list of integers"),
    ("POST", "/api/encode", {"text": "hi", "layers": [15.9]}, 422, "layers must be a list of integers"),
    ("POST", "/api/encode", {"text": "hi", "layers": [True]}, 422, "layers must be a list of integers"),
    ("POST", "/api/encode", {"text": "hi", "top": 1.5}, 422, "top must be an integer"),
    ("POST", "/api/encode", {"text": "hi", "colour": "red"}, 422, "unknown field 'colour'"),
    ("POST", "/api/encode", {}, 422, "missing field 'text'"),
    ("POST", "/api/encode", b"[" * 17_000 + b"]" * 17_000, 400, "nested more than 8 levels"),
    ("POST", "/api/encode", b'{"text": "' + b"y" * 10_000_000 + b'"}', 413, "larger than"),
    ("GET", "/api/feature/1/64", None, 404, "feature 64 does not exist"),
    ("GET", "/api/feature/9/1", None, 404, "no SAE for layer 9"),
    ("GET", "/api/feature/x/1", None, 422, "layer must be an integer"),
    ("GET", "/api/feature/1/" + "9" * 5000, None, 422, "feature must be an integer"),
    ("GET", "/api/feature/1/%C2%B2", None, 422, "feature must be an integer"),
    ("POST", "/api/steer", {"prompt": "hi", "layer": True, "features": {"2": 1}}, 422, "layer must be an integer"),
    ("POST", "/api/steer", {"prompt": "hi", "layer": 1, "features": {"2": "big"}}, 422, "features must be an object of numbers"),
    ("POST", "/api/steer", b'{"prompt": "hi", "layer": 1, "features": {"2": NaN}}', 400, "not valid JSON"),
    ("POST", "/api/steer", {"prompt": "hi", "layer": 1, "features": {"2": 1}, "max_new_tokens": 10_000}, 422,
     "max_new_tokens must be <= 64"),
    ("POST", "/api/steer", {"prompt": "hi", "layer": 1, "features": {}}, 422, "1 to 16"),
]
