"""Keys never leave in an error: every error text we store or print is scrubbed of credentials here.

Keys come from the environment only (``SECRET_ENV`` and any variable ending in a secret suffix); a vendor's error
body may echo our request headers, so the patterns also catch a key by where it travels.
"""

from __future__ import annotations

import os
import re

SECRET_ENV = ("POLYGON_API_KEY", "APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "DATABENTO_API_KEY",
              "MICROSTRUCTURE_REDIS_PASSWORD")
SECRET_SUFFIXES = ("_KEY", "_KEY_ID", "_SECRET", "_TOKEN", "_PASSWORD")
# A value this short is no credential, and replacing it everywhere would garble every message.
MIN_SECRET_LEN = 6
REDACTED = "***"
_PATTERNS = [
    # A header a key travels in, however it is printed: "Authorization: Bearer x", {'APCA-API-KEY-ID': 'x'},
    # ("x-api-key", "x"). The auth scheme word is kept, the credential goes.
    (re.compile(r"(?i)\b(authorization|proxy-authorization|apca-api-key-id|apca-api-secret-key|x-api-key|api-key)"
                r"([\"']?\s*[:=,]\s*[\"']?)((?:bearer|basic|token)\s+)?[^\s\"',;&}\]]+"), r"\1\2\3" + REDACTED),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # Query parameters: ?apiKey=x, &api_key=x, token=x.
    (re.compile(r"(?i)\b(api[_-]?key|access[_-]?token|token|secret|secret[_-]?key|key[_-]?id|password)=[^&\s\"'#;]+"),
     r"\1=" + REDACTED),
    # A password in a URL: redis://:pw@host, https://user:pw@host.
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"), r"\1" + REDACTED + "@"),
]


def _secret_values() -> list[str]:
    """Every credential in this process's environment, longest first (a key may contain a shorter one)."""
    from urllib.parse import quote

    vals: set[str] = set()
    for name, v in os.environ.items():
        if name in SECRET_ENV or name.upper().endswith(SECRET_SUFFIXES):
            v = v.strip()
            if len(v) >= MIN_SECRET_LEN:
                vals |= {v, quote(v, safe="")}
    return sorted(vals, key=len, reverse=True)


def scrub(text: object) -> str:
    """``text`` with key values from the environment, auth headers, key query parameters, bearer tokens and
    URL passwords replaced by ``***``. Every error text that is stored (lake/outcomes, quarantine) or printed
    goes through here: a vendor error body may echo our request headers."""
    s = str(text)
    for v in _secret_values():
        s = s.replace(v, REDACTED)
    for pat, repl in _PATTERNS:
        s = pat.sub(repl, s)
    return s
