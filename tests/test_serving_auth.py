"""The serving API key check (the serve tests send real requests to every route)."""

from __future__ import annotations

import hashlib

import pytest

from loraflow import serving_auth

KEY = hashlib.sha256(b"s3cret").hexdigest()


@pytest.mark.unit
@pytest.mark.parametrize("key_sha256, authorization, accepted", [
    (None, None, True),  # no key configured: an open server
    (None, "Bearer anything", True),
    (KEY, "Bearer s3cret", True),
    (KEY, "Bearer wrong", False),
    (KEY, "s3cret", False),
    (KEY, "", False),
    (KEY, None, False),  # headers unknown: fail closed
])
def test_a_request_is_answered_only_with_the_key(key_sha256, authorization, accepted):
    assert serving_auth.accepted(key_sha256, authorization) is accepted
