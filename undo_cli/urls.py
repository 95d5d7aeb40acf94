"""Servers as messages name them: URLs, loopback, keys redacted, a server's own error words.

    base_urls("http://a:8000/v1,http://b:8000/v1")   # ["http://a:8000/v1", "http://b:8000/v1"]
    is_loopback("http://127.0.0.1:8000/v1")           # True: a local server needs no API key
    shown_url("http://user:pw@host/v1")               # "http://host/v1"
    redact("Authorization: Bearer sk-123", ["sk-123"])
    server_message(b'{"error": {"message": "model not found"}}')

Shared by the openai backend (backends/openai.py), the served teacher of
`undo train` (training/served_teacher.py) and the configs that take a
`--base-url`. Only the standard library: a config's checks import this.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse, urlunparse

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
SNIPPET = 200  # characters of a server's body quoted in a message


def is_loopback(url: str | None) -> bool:
    """The URL's host is this machine (a local server usually wants no key)."""
    host = urlparse(url).hostname if url else None
    return bool(host) and (host in LOOPBACK or host.startswith("127."))


def base_urls(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """--base-url as a list: one string (also "a,b") or a list of them; [] when unset."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [u.strip().rstrip("/") for item in items for u in str(item).split(",") if u.strip()]


def shown_url(url: str) -> str:
    """A URL fit for messages: user:password@ removed."""
    p = urlparse(url)
    if p.username or p.password:
        host = p.hostname or ""
        return urlunparse(p._replace(netloc=host + (f":{p.port}" if p.port else "")))
    return url


_AUTH = re.compile(r"""(?i)(authorization["']?\s*[:=]\s*["']?)(bearer\s+|basic\s+)?[^\s"',;}]+""")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret and every Authorization/Bearer value replaced by ***."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    text = _AUTH.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}***", text)
    return _BEARER.sub(r"\1***", text)


def snippet(body: bytes | str) -> str:
    """A server's body, quoted on one line and cut at SNIPPET characters."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    if not text:
        return "(an empty body)"
    return repr(text[:SNIPPET] + ("..." if len(text) > SNIPPET else ""))


def server_message(body: bytes) -> str:
    """The server's own words from an error body (vLLM, OpenAI and FastAPI shapes), one line."""
    try:
        data = json.loads(body)
    except ValueError:
        return snippet(body)
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        for key in ("message", "detail"):
            if inner.get(key):
                return str(inner[key]).splitlines()[0][:SNIPPET]
    return snippet(body)
