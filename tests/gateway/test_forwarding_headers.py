"""What the gateway sends Intuit in place of the caller's headers (a pure function)."""

from __future__ import annotations

from service.gateway.forwarding import USER_AGENT, request_headers


def test_the_callers_credentials_go_and_the_brokers_come() -> None:
    sent = dict(
        request_headers(
            [
                (b"Authorization", b"Bearer caller"),
                (b"x-api-key", b"qbk_secret"),
                (b"cookie", b"session=1"),
                (b"content-type", b"application/json"),
            ],
            "intuit-access-token",
        )
    )
    assert sent[b"authorization"] == b"Bearer intuit-access-token"
    assert b"x-api-key" not in sent and b"cookie" not in sent
    assert sent[b"content-type"] == b"application/json"
    assert sent[b"accept"] == b"application/json" and sent[b"accept-encoding"] == b"identity"


def test_a_user_agent_is_the_callers_if_it_sent_one_else_the_brokers() -> None:
    assert dict(request_headers([], "t"))[b"user-agent"] == USER_AGENT
    own = request_headers([(b"User-Agent", b"cietrade-billing/2.1")], "t")
    assert [v for k, v in own if k == b"user-agent"] == [b"cietrade-billing/2.1"]
