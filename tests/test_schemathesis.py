"""Property-based conformance: every operation in the OpenAPI document, fed generated valid and
invalid requests, answers without a server error and as the document says (status codes, content
types, headers, bodies), accepts what the document calls valid, rejects what it calls invalid, and
refuses requests without valid credentials. All of schemathesis' checks run.

Every operation is its own test against the live broker, from a fresh database seeded with
connections in each interesting state, so that destructive operations (delete, disconnect) cannot
starve the ones after them of real ids. Secured operations run as a cieTrade user (JWT) and as an
internal service (an API key with every scope).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import AnyHttpUrl, TypeAdapter, ValidationError
from schemathesis import Case
from schemathesis.core import NOT_SET
from schemathesis.generation.hypothesis.builder import ApiOperationMark
from schemathesis.schemas import APIOperation

from service.connections.schemas import TenantId
from service.main import create_app, openapi_yaml
from tests.conftest import (
    ALICE,
    COMPANY_1,
    COMPANY_2,
    DAVE,
    RETURN_URL,
    TENANT,
    Stack,
    broker_settings,
    user_headers,
)
from tests.support.intuit_user import CallbackResult
from tests.support.servers import ThreadedServer, free_port

TOKEN_PATH = "/connections/{connection_id}/token"
AUTHORIZE = ("POST", "/connections/{connection_id}/authorize")
CALLBACK = "GET /callback"
COMPLETE = "POST /connections/{connection_id}/complete"
_TENANT_ID: TypeAdapter[str] = TypeAdapter(TenantId)
_HTTP_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl)

CONFIG = schemathesis.Config.from_dict(
    {
        "request-timeout": 10,
        "generation": {
            "mode": "all",  # valid and invalid requests
            # Fuzzed cases per operation and caller, on top of the deterministic coverage cases
            # (boundaries, missing and malformed parameters): the module runs in about a minute.
            "max-examples": 25,
            # No example database in the working tree.
            "database": ":memory:",
            # The test's caller signs every request (test_operation); random Authorization and
            # X-API-Key values next to it would only turn cases into 401s. Missing and invalid
            # credentials are still tried: `ignored_auth` strips or garbles them on every success.
            "with-security-parameters": False,
        },
        "operations": [
            {
                # Intuit's redirect back can only succeed with a `state` the broker issued moments ago and a
                # `code` Intuit issued for it; for anything a generator can make, the documented answer is
                # 400 (invalid_state: the HTML page, or problem+json). That answer, and the linking rules
                # behind a real callback, are tested in tests/oauth/test_connect_flow.py.
                "include-name": CALLBACK,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
                    }
                },
            },
            {
                # Likewise a completion ticket: only one the callback handed out moments ago is good, so
                # any generated one is answered 400 invalid_state (or 404 for a connection the caller may
                # not see). Redeeming real tickets is tested in tests/oauth/test_connect_binding.py.
                "include-name": COMPLETE,
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
                    }
                },
            },
            {
                # Intuit signs its notifications with the app's verifier token; a generated signature
                # never matches, so the documented answer is 401 (413 for an oversized body). Verified
                # notifications are tested in tests/intuit_webhooks/test_intake.py.
                "include-name": "POST /intuit/webhooks",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "413"]}},
            },
            {
                # Which URLs may receive webhooks is decided after DNS resolution (https to public
                # addresses only), not by the document: a generated URL is refused with 422 (tested in
                # tests/events/test_webhooks.py); a good one becomes a public address (_public_webhook_url),
                # and past the per-tenant cap a create is 409.
                "include-name": "POST /webhook-endpoints",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "401", "403", "404", "409", "422", "429", "5xx"]
                    }
                },
            },
            {
                # The QuickBooks gateway relays whatever Intuit answers a generated path, query and body
                # (mostly 400 "Unsupported Operation"), or refuses a path that leaves the company (400);
                # a user is refused (403), a pending connection is 409, and a burst of cases may meet
                # the company's throttles (429). Real calls are tested in tests/gateway/.
                "include-path-regex": "/quickbooks/",
                "checks": {
                    "positive_data_acceptance": {
                        "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "415", "429", "5xx"]
                    }
                },
            },
        ],
    }
)
PUBLIC_WEBHOOK_URL = "https://93.184.216.34/hooks"


@dataclass
class Seeded:
    """What the running test seeded; read while Hypothesis draws and while requests are sent."""

    connection_ids: list[str] = field(default_factory=list)
    endpoint_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    cursors: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


SEEDED = Seeded()

# The app's document (tests/test_openapi.py: the one the broker serves).
schema = schemathesis.openapi.from_dict(yaml.safe_load(openapi_yaml()), config=CONFIG)


def _is_uuid(value: object) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _valid(adapter: TypeAdapter[Any], value: object) -> bool:
    """Whether the value is a string the broker's own model accepts."""
    if not isinstance(value, str):
        return False
    try:
        adapter.validate_python(value)
    except ValidationError:
        return False
    return True


@schema.hook("flatmap_path_parameters")
def real_connection_ids(ctx: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
    # A generated well-formed id never exists; use a seeded one about half of the time, so the
    # operations' success answers are exercised too. Malformed ids stay: negative cases must remain
    # negative.
    for name, seeded in [
        ("connection_id", SEEDED.connection_ids),
        ("endpoint_id", SEEDED.endpoint_ids),
        ("event_id", SEEDED.event_ids),
    ]:
        if (
            path_parameters and _is_uuid(path_parameters.get(name)) and seeded
        ):  # nothing seeded yet: cases built at collection
            return st.one_of(
                st.just(path_parameters),
                st.sampled_from(seeded).map(lambda real, name=name: {**path_parameters, name: real}),
            )
    return st.just(path_parameters)


@schema.hook("flatmap_query")
def seeded_tenant(ctx: schemathesis.HookContext, query: dict[str, Any] | None) -> Any:
    # Likewise a service's ?tenant_id=: sometimes the tenant that has connections.
    if not _valid(_TENANT_ID, (query or {}).get("tenant_id")):
        return st.just(query)
    return st.one_of(st.just(query), st.just({**(query or {}), "tenant_id": TENANT}))


# Values a document cannot describe, put right on every case just before it is sent: Coverage
# cases are built at collection time, when nothing is seeded yet, and pass no value hooks. Only
# values the document calls valid are replaced, by other valid ones, so negative cases stay
# negative.


def _issued_cursor(case: Case) -> None:
    # A page cursor is opaque: only one the broker issued is valid, and it rightly refuses others
    # (422, tests/connections/test_connections_api.py). A well-formed generated cursor becomes one
    # the broker issued for this operation; a malformed one (too long) stays, to be refused.
    value = (case.query or {}).get("cursor")
    if isinstance(value, str) and len(value) <= 200:
        case.query = {**case.query, "cursor": SEEDED.cursors[case.path]}


def _public_webhook_url(case: Case) -> None:
    # A URL the document calls valid becomes one of a public address (see CONFIG).
    if (
        (case.method.upper(), case.path) == ("POST", "/webhook-endpoints")
        and isinstance(case.body, dict)
        and isinstance(case.body.get("url"), str)
        and 0 < len(case.body["url"]) <= 2048
    ):
        case.body = {**case.body, "url": PUBLIC_WEBHOOK_URL}


def _allowed_return_url(case: Case) -> None:
    # Where the browser may return is configuration (BROKER_RETURN_URL_ALLOWLIST); refusing other
    # origins (400 return_url_not_allowed) is tested in tests/auth/test_authentication.py. A valid
    # generated return_url becomes the allowlisted one.
    if isinstance(case.body, dict) and _valid(_HTTP_URL, case.body.get("return_url")):
        case.body = {**case.body, "return_url": RETURN_URL}


# What a service must name where a user's JWT implies it; leaving it out is refused with 422
# (test_a_service_must_name_the_tenant_and_the_user below).
_SERVICE_NAMES = {
    ("GET", "/connections"): ("query", "tenant_id", TENANT),
    ("GET", "/status"): ("query", "tenant_id", TENANT),
    ("GET", "/status/stream"): ("query", "tenant_id", TENANT),
    ("POST", "/connections"): ("body", "tenant_id", TENANT),
    ("POST", "/connections/{connection_id}/authorize"): ("body", "user_id", "user-1"),
}


def _ticket_mode_return_url(case: Case) -> None:
    # In ticket mode (the default) authorize needs a return_url, to hand the completion ticket
    # back: configuration, not the document (cookie mode takes none). Leaving it out is refused
    # with 400 return_url_required (tests/oauth/test_connect_binding.py). A body valid without
    # one gets the allowlisted one; an invalid body stays invalid.
    if (case.method.upper(), case.path) != AUTHORIZE:
        return
    if isinstance(case.body, dict):
        if case.body.get("return_url") is None:
            case.body = {**case.body, "return_url": RETURN_URL}
    elif case.body is None or case.body is NOT_SET:
        case.body, case.media_type = {"return_url": RETURN_URL}, "application/json"


def _as_a_service_would(case: Case) -> None:
    """Name the tenant or the user, where a service must and the generated case did not."""
    where = _SERVICE_NAMES.get((case.method.upper(), case.path))
    if where is None:
        return
    location, name, value = where
    if location == "query":
        if (case.query or {}).get(name) is None:
            case.query = {**(case.query or {}), name: value}
    elif isinstance(case.body, dict):
        if case.body.get(name) is None:  # absent, or an explicit null: not named either way
            case.body = {**case.body, name: value}
    elif case.body is None or case.body is NOT_SET:  # a JSON null, or no body at all
        case.body, case.media_type = {name: value}, "application/json"


def _identities(operation: APIOperation) -> list[str]:
    if not operation.definition.raw.get("security"):
        return ["anonymous"]
    # The token endpoint is for services only: a user is refused it outright.
    if operation.path == TOKEN_PATH:
        return ["service"]
    return ["user", "service"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Secured operations run as a cieTrade user and as an internal service. This also gives each
    # test its own node id: pytest 9.2 builds it from the test's original name and parameters, and
    # would drop the operation schemathesis puts in an unparametrized test's name.
    if "identity" in metafunc.fixturenames:
        operation = ApiOperationMark.get(metafunc.definition.obj)
        metafunc.parametrize("identity", _identities(operation) if operation else ["anonymous"])


@pytest.fixture
async def seeded(
    identity: str,
    client: httpx.AsyncClient,
    new_connection: Callable[..., Awaitable[dict[str, Any]]],
    connect: Callable[..., Awaitable[CallbackResult]],
    service_headers: Callable[..., Awaitable[dict[str, str]]],
) -> AsyncIterator[Seeded]:
    """Connections in every state the operations tell apart, page cursors, the caller's
    credentials. Operations open to anyone (health, metrics, Intuit's callback) need none."""
    if identity == "anonymous":
        yield SEEDED
        return
    # Webhook endpoints before the events, so they have deliveries (and pages of them).
    hooks = await service_headers("webhooks:write", name="seed-webhooks")
    for _ in range(2):
        created = await client.post("/webhook-endpoints", json={"url": PUBLIC_WEBHOOK_URL}, headers=hooks)
        SEEDED.endpoint_ids.append(created.raise_for_status().json()["id"])
    pending = await new_connection()
    connected = await new_connection()
    linked = await connect(connected["id"], email=ALICE, realm_id=COMPANY_1)
    assert linked.params["result"] == "connected", linked
    awaiting = await new_connection()
    await connect(awaiting["id"], email=DAVE, realm_id=COMPANY_2)
    # A different QuickBooks user on the same connection (Intuit's "Switch admin" page): the broker
    # holds the new credentials as a pending link until someone confirms or declines.
    second = await connect(awaiting["id"], email=ALICE, realm_id=COMPANY_2, connect_anyway=True)
    assert second.params["result"] == "confirmation_required", second
    foreign = await new_connection(tenant="tenant-b")
    SEEDED.connection_ids = [pending["id"], connected["id"], awaiting["id"], foreign["id"]]

    pages = {
        "/connections": "/connections",
        "/connections/{connection_id}/events": f"/connections/{awaiting['id']}/events",
    }
    pages.update(
        {
            "/webhook-endpoints": "/webhook-endpoints",
            "/webhook-endpoints/{endpoint_id}/deliveries": (
                f"/webhook-endpoints/{SEEDED.endpoint_ids[0]}/deliveries"
            ),
        }
    )
    deliveries = await client.get(pages["/webhook-endpoints/{endpoint_id}/deliveries"], headers=hooks)
    SEEDED.event_ids = [d["event_id"] for d in deliveries.raise_for_status().json()["items"]]
    for template, url in pages.items():
        page = await client.get(
            url, params={"limit": 1}, headers=(hooks if template.startswith("/webhook") else user_headers())
        )
        SEEDED.cursors[template] = page.raise_for_status().json()["next_cursor"]
        assert SEEDED.cursors[template], (url, page.text)

    if identity == "user":
        SEEDED.headers = user_headers()
    elif identity == "service":
        SEEDED.headers = await service_headers(
            "status:read",
            "tokens:read",
            "connections:write",
            "webhooks:write",
            "quickbooks:read",
            "quickbooks:write",
        )
    yield SEEDED
    SEEDED.connection_ids, SEEDED.cursors, SEEDED.headers = [], {}, {}
    SEEDED.endpoint_ids, SEEDED.event_ids = [], []


@pytest.fixture(scope="module")
def fuzzed_broker(stack: Stack) -> Iterator[str]:
    """A broker like the stack's, on its database, whose event streams end after half a second:
    a stream's success is an answer that goes on, which a generated case cannot wait for."""
    port = free_port()
    server = ThreadedServer(
        create_app(
            broker_settings(stack.database_url, port, stack.emulator_url, BROKER_STREAM_MAX_SECONDS=0.5)
        ),
        port,
    ).start()
    yield server.url
    server.stop()


@pytest.fixture
def broker(fuzzed_broker: str, seeded: Seeded) -> Iterator[str]:
    yield fuzzed_broker


@schema.parametrize()
# The seeded state belongs to the operation's test, not to each generated case: cases that delete
# or disconnect a seeded connection leave the later ones fewer real ids, which is fine. Cases
# against a live server are slow to run, not slow to generate.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_operation(case: Case, broker: str, identity: str) -> None:
    _issued_cursor(case)
    _allowed_return_url(case)
    _public_webhook_url(case)
    if identity == "service":
        _as_a_service_would(case)
    _ticket_mode_return_url(case)
    # Credentials go on at call time: coverage cases are built at collection, before any exist.
    case.call_and_validate(base_url=broker, headers=SEEDED.headers)


async def test_a_service_must_name_the_tenant_and_the_user(
    client: httpx.AsyncClient,
    service_headers: Callable[..., Awaitable[dict[str, str]]],
    new_connection: Callable[..., Awaitable[dict[str, Any]]],
) -> None:
    headers = await service_headers("status:read", "connections:write")
    connection = await new_connection()
    requests: list[tuple[str, str, dict[str, str] | None]] = [
        ("GET", "/connections", None),
        ("GET", "/status", None),
        ("GET", "/status/stream", None),
        ("POST", "/connections", {}),
        ("POST", f"/connections/{connection['id']}/authorize", {"return_url": RETURN_URL}),
    ]
    for method, url, body in requests:
        response = await client.request(method, url, json=body, headers=headers)
        assert response.status_code == 422, (method, url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "validation_error"


# What the run above found, pinned.


async def test_method_not_allowed_names_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    # Each route carries one operation; the router's own 405 named only the first route's methods.
    for method, url, allowed in [
        ("PUT", "/connections", "GET, POST"),
        ("POST", f"/connections/{uuid.uuid4()}", "GET, PATCH, DELETE"),
        ("DELETE", "/status", "GET"),
    ]:
        response = await client.request(method, url, headers=user_headers())
        assert response.status_code == 405, (method, url)
        assert response.headers["allow"] == allowed
        assert response.json()["code"] == "method_not_allowed"


async def test_a_body_that_is_not_text_is_a_documented_400(client: httpx.AsyncClient) -> None:
    document = yaml.safe_load(openapi_yaml())
    for method, url, template in [
        ("POST", "/connections", "/connections"),
        ("PATCH", f"/connections/{uuid.uuid4()}", "/connections/{connection_id}"),
    ]:
        response = await client.request(
            method, url, content=b"\xff\xfe{", headers={**user_headers(), "Content-Type": "application/json"}
        )
        assert response.status_code == 400, (method, url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert "400" in document["paths"][template][method.lower()]["responses"]
