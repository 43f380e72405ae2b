"""Property-based conformance: every operation in the OpenAPI document, fed generated valid and
invalid requests, answers without a server error and as the document says (status codes, content
types, headers, bodies), and refuses requests without valid credentials.

Every operation is its own test against the live broker, from a fresh database seeded with
connections in each interesting state, so that destructive operations (delete, disconnect) cannot
starve the ones after them of real ids. Secured operations run twice: as a cieTrade user (JWT) and
as an internal service (API key with every scope).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.config import HealthCheck
from schemathesis.generation.hypothesis.builder import ApiOperationMark
from schemathesis.schemas import APIOperation, BaseSchema

from service.connections.schemas import TenantId
from service.main import openapi_yaml
from tests.conftest import ALICE, COMPANY_1, COMPANY_2, DAVE, TENANT, Stack, user_headers
from tests.support.intuit_user import CallbackResult

# Fuzzed cases per operation and identity, on top of the deterministic coverage cases (boundaries,
# missing and malformed parameters); enough to find what this suite is for within a minute or so.
MAX_EXAMPLES = 25
TOKEN_PATH = "/connections/{connection_id}/token"
_TENANT_PATTERN = re.compile(next(m.pattern for m in TenantId.__metadata__ if hasattr(m, "pattern")))


@dataclass
class Seeded:
    """What the running test seeded; read while Hypothesis draws and while requests are sent."""

    connection_ids: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


SEEDED = Seeded()


def _schema() -> BaseSchema:
    """The app's document (tests/test_openapi.py: the one the broker serves), configured for this
    suite."""
    schema = schemathesis.openapi.from_dict(yaml.safe_load(openapi_yaml()))
    config = schema.config
    config.update(request_timeout=10,
                  # Seeding and the live server make a slow-looking first draw; that is not a bug.
                  suppress_health_check=[HealthCheck.too_slow])
    config.generation.update(modes=list(GenerationMode), max_examples=MAX_EXAMPLES,
                             # Keep no example database in the working tree.
                             database=":memory:")

    @schema.hook("flatmap_path_parameters")
    def real_connection_ids(ctx: schemathesis.HookContext, path_parameters: dict[str, Any]) -> Any:
        # A generated well-formed id never exists; use a seeded one about half of the time, so the
        # operations' success answers are exercised too. Malformed ids stay: negative cases must
        # remain negative.
        if not _is_uuid(path_parameters.get("connection_id")):
            return st.just(path_parameters)
        return st.one_of(st.just(path_parameters), st.sampled_from(SEEDED.connection_ids).map(
            lambda real: {**path_parameters, "connection_id": real}))

    @schema.hook("flatmap_query")
    def seeded_tenant(ctx: schemathesis.HookContext, query: dict[str, Any] | None) -> Any:
        # Likewise a service's ?tenant_id=: sometimes the tenant that has connections.
        value = (query or {}).get("tenant_id")
        if not (isinstance(value, str) and _TENANT_PATTERN.fullmatch(value)):
            return st.just(query)
        return st.one_of(st.just(query), st.just({**(query or {}), "tenant_id": TENANT}))

    return schema


def _is_uuid(value: object) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


class Credentials:
    """The running test's caller, on every generated request (none for anonymous tests)."""

    def get(self, case: Case, ctx: schemathesis.AuthContext) -> dict[str, str] | None:
        return SEEDED.headers or None

    def set(self, case: Case, data: dict[str, str], ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), **data}


schema = _schema()
schema.auth(refresh_interval=None)(Credentials)


def _identities(operation: APIOperation) -> list[str]:
    if not operation.definition.raw.get("security"):
        return ["anonymous"]
    # The token endpoint is for services only: a user is refused it outright.
    if operation.path == TOKEN_PATH:
        return ["service"]
    return ["user", "service"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Secured operations run as a cieTrade user (JWT) and as an internal service (an API key with
    # every scope). This also gives each test its own node id: pytest 9.2 builds it from the test's
    # original name and parameters, and would drop the operation's label for unparametrized tests.
    if "identity" in metafunc.fixturenames:
        operation = ApiOperationMark.get(metafunc.definition.obj)
        metafunc.parametrize("identity", _identities(operation) if operation else ["anonymous"])


@pytest.fixture
async def seeded(identity: str, new_connection: Callable[..., Awaitable[dict[str, Any]]],
                 connect: Callable[..., Awaitable[CallbackResult]],
                 service_headers: Callable[..., Awaitable[dict[str, str]]]) -> AsyncIterator[Seeded]:
    """Connections in every state the operations tell apart, and a service's API key."""
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
    if identity == "user":
        SEEDED.headers = user_headers()
    elif identity == "service":
        SEEDED.headers = await service_headers("status:read", "tokens:read", "connections:write")
    yield SEEDED
    SEEDED.connection_ids, SEEDED.headers = [], {}


@pytest.fixture
def broker(stack: Stack, seeded: Seeded) -> Iterator[str]:
    yield stack.broker_url


@schema.parametrize()
def test_operation(case: Case, broker: str) -> None:
    case.call_and_validate(base_url=broker)
