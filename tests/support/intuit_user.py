"""A person at Intuit's pages, driven over HTTP: sign in, pick a company, Connect or Cancel.

It speaks only to the emulator's HTML forms (as a browser would) and then follows Intuit's
redirect back to the broker's /callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import httpx


@dataclass
class CallbackResult:
    status_code: int
    location: str | None
    params: dict[str, str]
    body: str
    callback_url: str
    headers: dict[str, str] = field(default_factory=dict)
    # The answer to POST /connections/{id}/complete, when the callback handed back a ticket.
    completion: httpx.Response | None = None
    callback_params: dict[str, str] = field(default_factory=dict)  # as the callback sent them


async def sign_in_and_decide(
    authorization_url: str,
    *,
    email: str,
    realm_id: str | None = None,
    decision: str = "allow",
    connect_anyway: bool = False,
    follow_to_broker: bool = True,
    cookies: dict[str, str] | None = None,
) -> CallbackResult:
    """Walk the emulator's flow like a browser; return what the broker answered at /callback."""
    async with httpx.AsyncClient(timeout=30) as browser:
        start = await browser.get(authorization_url)
        assert start.status_code == 302, start.text
        flow_url = str(start.next_request.url) if start.next_request else start.headers["location"]
        flow_url = str(httpx.URL(authorization_url).join(flow_url))
        signed = await browser.post(f"{flow_url}/signin", data={"email": email})
        assert signed.status_code in (302, 303), signed.text
        page = await browser.get(flow_url)
        if 'id="company-' in page.text or "id=company-" in page.text:
            assert realm_id is not None, "several companies: name the realm"
            chosen = await browser.post(f"{flow_url}/company", data={"realm_id": realm_id})
            assert chosen.status_code in (302, 303), chosen.text
        form = {"decision": decision}
        if connect_anyway:
            form["connect_anyway"] = "true"
        answer = await browser.post(f"{flow_url}/consent", data=form)
        assert answer.status_code in (302, 303), answer.text
        callback_url = answer.headers["location"]
        if not follow_to_broker:
            return CallbackResult(answer.status_code, callback_url, {}, answer.text, callback_url)
        # Only the broker's own cookies (cookie mode) go with the callback, as in a browser.
        sent = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        back = await browser.get(callback_url, headers=sent)
        location = back.headers.get("location")
        params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()} if location else {}
        return CallbackResult(
            back.status_code,
            location,
            params,
            back.text,
            callback_url,
            dict(back.headers),
            callback_params=dict(params),
        )
