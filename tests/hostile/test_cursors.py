"""Page cursors are opaque strings from the caller: whatever arrives, a bad one is a 422."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core import pagination
from service.core.errors import ValidationFailed
from tests.conftest import user_headers


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CURSORS = [
    "é",  # non-ASCII
    "ünïcödé-cursor",
    "\u2603\u2603\u2603\u2603",
    "%%%",
    "abc",  # bad base64 padding
    "====",
    "-" * 200,
    _b64("99999999999999999999999999999"),  # past bigint
    _b64("9223372036854775808"),  # just past bigint
    _b64("-1"),
    _b64("²"),  # a digit to str.isdigit(), not to int()
    _b64("٣"),  # an Arabic-Indic digit
    _b64(b"\xff\xfe"),  # not UTF-8
    _b64("\x00"),
    _b64("+1"),
    _b64(" 7"),
    _b64("1e10"),
    _b64("99999-12-31T00:00:00+00:00|00000000-0000-0000-0000-000000000000"),
    _b64("9999-12-31T23:59:59+14:00|00000000-0000-0000-0000-000000000000"),
    _b64("0001-01-01T00:00:00-14:00|00000000-0000-0000-0000-000000000000"),
    _b64("2024-01-01T00:00:00\x00|00000000-0000-0000-0000-000000000000"),
    _b64("2024-01-01T00:00:00+00:00|00000000-0000-0000-0000-00000000000\x00"),
    _b64("2024-01-01|x"),
    _b64("||"),
    _b64("-1|-1"),
]


@pytest.mark.parametrize("cursor", CURSORS)
async def test_bad_cursors_are_validation_errors(
    client: httpx.AsyncClient, new_connection, cursor: str
) -> None:
    conn = await new_connection()
    for url in ("/connections", f"/connections/{conn['id']}/events"):
        response = await client.get(url, params={"cursor": cursor}, headers=user_headers())
        assert response.status_code == 422, (url, cursor, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "validation_error"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.binary(max_size=60).map(_b64))
def test_any_text_either_decodes_or_is_a_validation_error(cursor: str) -> None:
    for decode in (pagination.time_id_cursor, pagination.id_cursor):
        try:
            decode(cursor)
        except ValidationFailed:
            pass


def test_issued_cursors_decode_to_what_was_encoded() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    ident = uuid.uuid4()
    cursor = pagination.encode_cursor(created.isoformat(), str(ident))
    assert pagination.time_id_cursor(cursor) == (created, ident)
    assert pagination.id_cursor(pagination.encode_cursor(str(2**63 - 1))) == 2**63 - 1
