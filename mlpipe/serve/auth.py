"""The bearer-token check (``auth_tokens``): any configured token opens every route but the public ones."""
from __future__ import annotations

import hmac


def authorized(header: str, tokens: list[bytes]) -> bool:
    """``header``: the request's Authorization header. The scheme in any case (RFC 7235); the token is
    compared with every configured one, so the time does not depend on which one matched."""
    scheme, _, credentials = header.strip().partition(" ")
    given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given, t)
    return ok and bool(given)
