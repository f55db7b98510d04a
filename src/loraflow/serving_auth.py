"""The serving API key check, apart from the ingress so that it is tested without Ray or vLLM."""

from __future__ import annotations

import hashlib
import hmac


def accepted(key_sha256: str | None, authorization: str | None) -> bool:
    """Whether a request may be answered: any request when no key is configured; otherwise one
    whose `Authorization` header is `Bearer <key>` (SHA-256s compared in constant time). A request
    whose headers are not known (None) is refused: the check fails closed."""
    if key_sha256 is None:
        return True
    if authorization is None or not authorization.startswith("Bearer "):
        return False
    given = hashlib.sha256(authorization[len("Bearer "):].encode()).hexdigest()
    return hmac.compare_digest(given, key_sha256)
