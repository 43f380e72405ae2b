"""QuickBooks Online's Accounting API (v3) under `/v3/company/{realmId}/…`.

Every call goes through the same door, in Intuit's order: a fresh `intuit_tid`; the bearer
token, which must be live and for this company (else 401 Fault 3200) with the accounting scope
(else 403 Fault 3100); the route (paths are case-sensitive: anything else is Intuit's 400
"Unsupported Operation"); the throttles (429 Fault 3001 with `Retry-After`); metering; for a
write with `?requestid=`, the answer remembered for an earlier identical id; then an injected
fault (`/_emulator/faults`, endpoint `accounting`) and the injected latency; then the work.

Answers are JSON when the request's `Accept` names `application/json`, otherwise XML
(`IntuitResponse`), QuickBooks' default. `minorversion` below 75 is treated as 75; nothing here
depends on it. CompanyInfo (`GET …/companyinfo/{id}`) stays in oauth.py, ahead of this router.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.types import Receive, Scope, Send

from . import reports
from .books import (
    EMPTY_ENTITIES,
    ENTITIES,
    ENTITY_PATHS,
    Books,
    Ledger,
    QboError,
    business,
    company_date,
    missing,
    parse_time,
    unsupported_operation,
)
from .config import ACCOUNTING_SCOPE
from .faults import DEFAULT_TIMEOUT_S, Fault, new_intuit_tid
from .oauth import _DroppedResponse, intuit_time
from .query import canonical_entity, execute, parse
from .state import Store
from .traffic import Answer

MINOR_VERSION = 75
BATCH_MAX = 30
REQUEST_ID_MAX = 50
CDC_MAX_OBJECTS = 1000
CDC_LOOKBACK_S = 30 * 24 * 3600
UPLOAD_MAX_BYTES = 100 * 1024 * 1024
_XMLNS = "http://schema.intuit.com/finance/v3"
_JSON = "application/json;charset=UTF-8"
_XML = "application/xml;charset=UTF-8"
# Keys QuickBooks' XML carries as attributes rather than child elements.
_XML_ATTRIBUTES: dict[str, frozenset[str]] = {
    "Fault": frozenset({"type"}),
    "Error": frozenset({"code", "element"}),
    "QueryResponse": frozenset({"startPosition", "maxResults", "totalCount"}),
    "BatchItemResponse": frozenset({"bId"}),
    "Row": frozenset({"type", "group"}),
    "ColData": frozenset({"value", "id"}),
}
_ENTITY_ATTRIBUTES = frozenset({"domain", "sparse"})


@dataclass
class Operation:
    """What a request asks for, decided from its method, path and body before any work."""

    name: str  # create, update, delete, void, send, read, query, batch, cdc, report, upload
    metering: str | None  # "core" (data in) or "coreplus" (data out)
    write: bool
    entity: str | None = None
    entity_id: str | None = None
    report: str | None = None
    document: Any = None  # the parsed JSON body, or the query text


# -- rendering ---------------------------------------------------------------------------------


def _xml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def xml_element(tag: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "".join(xml_element(tag, item) for item in value)
    if not isinstance(value, dict):
        return f"<{tag}>{escape(_xml_value(value))}</{tag}>"
    attribute_names = _XML_ATTRIBUTES.get(tag, frozenset()) | _ENTITY_ATTRIBUTES
    attributes = "".join(
        f" {k}={quoteattr(_xml_value(v))}"
        for k, v in value.items()
        if k in attribute_names and not isinstance(v, dict | list)
    )
    children = "".join(
        xml_element(k, v) for k, v in value.items() if k not in attribute_names or isinstance(v, dict | list)
    )
    return f"<{tag}{attributes}>{children}</{tag}>" if children else f"<{tag}{attributes}/>"


def _xml_document(payload: dict[str, Any]) -> str:
    time_stamp = payload.get("time")
    stamp = f" time={quoteattr(str(time_stamp))}" if time_stamp else ""
    body = "".join(xml_element(k, v) for k, v in payload.items() if k != "time")
    return (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<IntuitResponse xmlns="{_XMLNS}"{stamp}>{body}</IntuitResponse>'
    )


def _render(payload: dict[str, Any], status: int, as_json: bool) -> Answer:
    if as_json:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        return Answer(status, body, _JSON)
    return Answer(status, _xml_document(payload).encode(), _XML)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "").lower()


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def minor_version(raw: str | None) -> int:
    """The minor version a request is served at: anything below 75 (or unreadable) is 75."""
    try:
        return max(MINOR_VERSION, int(raw or MINOR_VERSION))
    except ValueError:
        return MINOR_VERSION


# -- routing -----------------------------------------------------------------------------------


def _json_body(raw: bytes, media_type: str) -> Any:
    if media_type != "application/json":
        raise QboError(
            "1050",
            "Invalid Content Type",
            f"Content-Type must be application/json for this request; got {media_type or 'none'}",
            status=415,
        )
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise QboError(
            "2010",
            "Request has invalid or unsupported property",
            f"Property Name:{exc} specified is unsupported or invalid",
        ) from None


def resolve(request: Request, realm_id: str, rest: str, raw: bytes) -> Operation:
    """The operation a request names, or Intuit's 400 "Unsupported Operation"."""
    method = request.method
    params = request.query_params
    parts = rest.split("/")
    head = parts[0]
    media_type = _media_type(request)

    def wrong_method() -> QboError:
        return unsupported_operation(
            f"Operation No resource method found for {method}, return 405 with Allow header is not supported."
        )

    if "" in parts:
        pass  # fall through to "not found"
    elif head == "query" and len(parts) == 1:
        if method == "GET":
            return Operation("query", "coreplus", False, document=params.get("query", ""))
        if method == "POST":
            if media_type not in ("application/text", "text/plain"):
                raise QboError(
                    "1050",
                    "Invalid Content Type",
                    "A query sent with POST must be Content-Type: application/text",
                    status=415,
                )
            return Operation("query", "coreplus", False, document=raw.decode("utf-8", "replace"))
        raise wrong_method()
    elif head == "batch" and len(parts) == 1:
        if method != "POST":
            raise wrong_method()
        document = _json_body(raw, media_type)
        items = document.get("BatchItemRequest") if isinstance(document, dict) else None
        items = items if isinstance(items, list) else []
        reads = any(isinstance(i, dict) and "Query" in i for i in items)
        writes = any(isinstance(i, dict) and "Query" not in i for i in items)
        return Operation("batch", "coreplus" if reads else "core", writes, document=document)
    elif head == "cdc" and len(parts) == 1:
        if method != "GET":
            raise wrong_method()
        return Operation("cdc", "coreplus", False)
    elif head == "reports" and len(parts) == 2:
        if method != "GET":
            raise wrong_method()
        return Operation("report", "coreplus", False, report=parts[1])
    elif head == "upload" and len(parts) == 1:
        if method != "POST":
            raise wrong_method()
        return Operation("upload", "core", True)
    elif head in ENTITY_PATHS and len(parts) <= 3:
        entity = ENTITY_PATHS[head]
        if len(parts) == 1:
            if method != "POST":
                raise wrong_method()
            document = _json_body(raw, media_type)
            if not isinstance(document, dict):
                raise QboError(
                    "2010",
                    "Request has invalid or unsupported property",
                    f"Property Name:the request body must be a {entity} object "
                    "specified is unsupported or invalid",
                )
            operation = params.get("operation")
            if operation is None:
                operation = "update" if document.get("Id") not in (None, "") else "create"
            if operation not in ("create", "update", "delete", "void"):
                raise unsupported_operation(f"Operation {operation} is not supported.")
            return Operation(operation, "core", True, entity=entity, document=document)
        if len(parts) == 2:
            if method != "GET":
                raise wrong_method()
            return Operation("read", "coreplus", False, entity=entity, entity_id=parts[1])
        if parts[2] == "send" and entity == "Invoice":
            if method != "POST":
                raise wrong_method()
            return Operation("send", "core", True, entity=entity, entity_id=parts[1])
    raise unsupported_operation(
        f"Operation Could not find resource for relative : "
        f"/v3/company/{realm_id}/{rest} of full path: {request.url} is "
        "not supported."
    )


# -- the router --------------------------------------------------------------------------------


def accounting_router(store: Store) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    books: Books = store.books

    def stamp() -> str:
        return intuit_time(store.now())

    def fault_answer(error: QboError, as_json: bool) -> Answer:
        return _render({"Fault": error.fault(), "time": stamp()}, error.status, as_json)

    def send(answer: Answer, tid: str, **headers: str) -> Response:
        return Response(
            answer.body, answer.status, media_type=answer.media_type, headers={"intuit_tid": tid, **headers}
        )

    def auth_failure(detail: str, as_json: bool, tid: str) -> Response:
        error = QboError(
            "3200",
            "message=AuthenticationFailed; errorCode=003200; statusCode=401",
            detail,
            status=401,
            kind="AUTHENTICATION",
        )
        body = {
            "Fault": {
                "Error": [{"Message": error.message, "Detail": detail, "code": "3200"}],
                "type": "AUTHENTICATION",
            },
            "time": stamp(),
        }
        return send(
            _render(body, 401, as_json),
            tid,
            **{"WWW-Authenticate": 'Bearer realm="Intuit", error="invalid_token"'},
        )

    def throttled(retry_after: int, as_json: bool, tid: str) -> Response:
        body = {
            "Fault": {
                "Error": [
                    {
                        "Message": "message=ThrottleExceeded; errorCode=003001; statusCode=429",
                        "Detail": "The request limit was reached.",
                        "code": "3001",
                    }
                ],
                "type": "SERVICE",
            },
            "time": stamp(),
        }
        return send(_render(body, 429, as_json), tid, **{"Retry-After": str(retry_after)})

    def status_fault(realm_id: str, fault: Fault, as_json: bool, tid: str) -> Response:
        status = fault.status or 503
        if status == 429:
            store.traffic.count_throttled(realm_id, "fault")
            return throttled(max(1, int(fault.delay_s or 1)), as_json, tid)
        body = {
            "Fault": {
                "Error": [
                    {
                        "Message": "An application error has occurred while processing your request",
                        "Detail": f"System Failure Error: HTTP {status}",
                        "code": "10000",
                    }
                ],
                "type": "SystemFault",
            },
            "time": stamp(),
        }
        return send(_render(body, status, as_json), tid)

    @router.api_route("/v3/company/{realm_id}/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def accounting(realm_id: str, rest: str, request: Request) -> Response:
        tid = new_intuit_tid()
        as_json = _wants_json(request)
        checked = store.check_access(_bearer(request))
        if isinstance(checked, str):
            return auth_failure(f"{checked}: the OAuth 2.0 access token is invalid", as_json, tid)
        grant, _user = checked
        if grant.realm_id != realm_id or realm_id not in store.companies:
            return auth_failure("Token not valid for this company (realmId)", as_json, tid)
        if ACCOUNTING_SCOPE not in grant.scopes:
            error = QboError(
                "3100",
                "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                "The app is not authorized for the accounting scope",
                status=403,
                kind="AUTHENTICATION",
            )
            return send(fault_answer(error, as_json), tid)
        minor_version(request.query_params.get("minorversion"))
        raw = await request.body() if request.method != "GET" else b""
        try:
            operation = resolve(request, realm_id, rest, raw)
        except QboError as error:
            return send(fault_answer(error, as_json), tid)

        client_id = grant.client_id
        refusal = store.traffic.enter(
            realm_id, client_id, store.config.limits, batch=operation.name == "batch"
        )
        if refusal is not None:
            return throttled(refusal.retry_after, as_json, tid)
        store.traffic.meter(realm_id, operation.metering, operation.name)
        streaming = False
        key: tuple[str, str, str] | None = None
        owned = False
        try:
            request_id = request.query_params.get("requestid") if request.method != "GET" else None
            replay: Answer | None = None
            if request_id:
                if operation.name != "batch" and len(request_id) > REQUEST_ID_MAX:
                    return send(fault_answer(_request_id_too_long(request_id), as_json), tid)
                key = (client_id, realm_id, request_id)
                replay = await store.request_ids.claim(key)
                owned = replay is None
            fault = store.faults.take("accounting", is_write=operation.write and replay is None)
            if store.config.latency_ms > 0:
                await asyncio.sleep(store.config.latency_ms / 1000)
            if fault is not None and fault.kind == "timeout":
                await asyncio.sleep(DEFAULT_TIMEOUT_S if fault.delay_s is None else fault.delay_s)
            if fault is not None and fault.kind == "status":
                return status_fault(realm_id, fault, as_json, tid)
            if replay is not None:
                return send(replay, tid)
            if operation.name == "report":
                response = report_response(operation, request, as_json, tid, realm_id, client_id)
                streaming = isinstance(response, _ReleasingStream)
                return response
            if operation.name == "upload":
                answer = await upload(realm_id, request, as_json)
            else:
                answer = work(realm_id, operation, request, as_json, request_id)
            if owned and key is not None and answer.status < 500:
                store.request_ids.remember(key, answer)
                owned = False
            if fault is not None and fault.kind == "drop_after_commit":
                # The work is done (and remembered for its requestid); the answer is lost.
                if fault.delay_s is None:
                    return _DroppedResponse()
                await asyncio.sleep(fault.delay_s)
            return send(answer, tid)
        finally:
            if owned and key is not None:
                store.request_ids.release(key)
            if not streaming:
                store.traffic.leave(realm_id, client_id)

    # -- the work ---------------------------------------------------------------------------

    def work(
        realm_id: str, operation: Operation, request: Request, as_json: bool, request_id: str | None
    ) -> Answer:
        try:
            with store.lock:
                ledger = store.ledger(realm_id)
                payload = run(ledger, operation, request, request_id)
                if operation.write:
                    store.books_changed()
        except QboError as error:
            return fault_answer(error, as_json)
        return _render(payload, 200, as_json)

    def run(ledger: Ledger, operation: Operation, request: Request, request_id: str | None) -> dict[str, Any]:
        now = store.now()
        name, entity = operation.name, operation.entity
        if name == "read":
            assert entity is not None and operation.entity_id is not None
            return {entity: books.read(ledger, entity, operation.entity_id), "time": stamp()}
        if name == "send":
            assert operation.entity_id is not None
            document = books.send(ledger, operation.entity_id, request.query_params.get("sendTo"), now)
            return {"Invoice": document, "time": stamp()}
        if name in ("create", "update", "delete", "void"):
            assert entity is not None
            return {entity: entity_operation(ledger, name, entity, operation.document, now), "time": stamp()}
        if name == "query":
            return {"QueryResponse": query(ledger, str(operation.document)), "time": stamp()}
        if name == "cdc":
            return cdc(ledger, request, now)
        if name == "batch":
            return batch(ledger, operation.document, request_id, now)
        raise unsupported_operation(f"Operation {name} is not supported.")

    def entity_operation(ledger: Ledger, name: str, entity: str, document: Any, now: float) -> dict[str, Any]:
        if not isinstance(document, dict):
            raise QboError(
                "2010",
                "Request has invalid or unsupported property",
                f"Property Name:{entity} specified is unsupported or invalid",
            )
        if name == "create":
            return books.create(ledger, entity, document, now)
        if name == "update":
            return books.update(ledger, entity, document, now)
        if name == "delete":
            return books.delete(ledger, entity, document, now)
        return books.void(ledger, entity, document, now)

    def query(ledger: Ledger, text: str) -> dict[str, Any]:
        parsed = parse(text)
        entity = canonical_entity(parsed.entity)
        documents = [] if entity in EMPTY_ENTITIES else list(ledger.entities[entity].values())
        return execute(parsed, documents)

    def cdc(ledger: Ledger, request: Request, now: float) -> dict[str, Any]:
        names = request.query_params.get("entities")
        since_raw = request.query_params.get("changedSince")
        if not names:
            raise missing("entities")
        if not since_raw:
            raise missing("changedSince")
        since = parse_time(since_raw)
        if since is None:
            raise QboError(
                "4001",
                "Invalid query",
                f"QueryValidationError: changedSince is not a valid date-time: {since_raw}",
            )
        if since < now - CDC_LOOKBACK_S:
            raise QboError(
                "4001", "Invalid query", "QueryValidationError: changedSince must be within the last 30 days"
            )
        wanted: list[str] = []
        for raw_name in names.split(","):
            known = next(
                (e for e in (*ENTITIES, *EMPTY_ENTITIES) if e.lower() == raw_name.strip().lower()), None
            )
            if known is None:
                raise QboError(
                    "4001", "Invalid query", f"QueryValidationError: Invalid entity name: {raw_name.strip()}"
                )
            if known not in wanted:
                wanted.append(known)
        changed = books.changes_since(ledger, [w for w in wanted if w in ENTITIES], since)
        budget = CDC_MAX_OBJECTS
        responses: list[dict[str, Any]] = []
        for name in wanted:
            rows = changed.get(name, [])[:budget]
            budget -= len(rows)
            responses.append(
                {name: rows, "startPosition": 1, "maxResults": len(rows), "totalCount": len(rows)}
                if rows
                else {}
            )
        return {"CDCResponse": [{"QueryResponse": responses}], "time": stamp()}

    def batch(ledger: Ledger, document: Any, request_id: str | None, now: float) -> dict[str, Any]:
        items = document.get("BatchItemRequest") if isinstance(document, dict) else None
        if not isinstance(items, list) or not items:
            raise missing("BatchItemRequest")
        if len(items) > BATCH_MAX:
            raise QboError(
                "1040",
                "Batch size exceeds allowed limit",
                f"The batch has {len(items)} BatchItemRequest objects; the limit is {BATCH_MAX}.",
            )
        responses: list[dict[str, Any]] = []
        for item in items:
            bid = item.get("bId") if isinstance(item, dict) else None
            answer: dict[str, Any] = {"bId": bid}
            try:
                if not isinstance(item, dict) or not bid:
                    raise missing("bId")
                if request_id and len(request_id) + len(str(bid)) > REQUEST_ID_MAX:
                    raise _request_id_too_long(request_id + str(bid))
                answer.update(batch_item(ledger, item, now))
            except QboError as error:
                answer["Fault"] = error.fault()
            responses.append(answer)
        return {"BatchItemResponse": responses, "time": stamp()}

    def batch_item(ledger: Ledger, item: dict[str, Any], now: float) -> dict[str, Any]:
        if "Query" in item:
            return {"QueryResponse": query(ledger, str(item["Query"]))}
        present = [e for e in ENTITIES if e in item]
        if len(present) != 1:
            raise missing("Entity")
        entity = present[0]
        operation = item.get("operation")
        if operation is None:
            raise missing("operation")
        if operation not in ("create", "update", "delete"):
            raise unsupported_operation(f"Operation {operation} is not supported.")
        return {entity: entity_operation(ledger, operation, entity, item[entity], now)}

    async def upload(realm_id: str, request: Request, as_json: bool) -> Answer:
        if _media_type(request) != "multipart/form-data":
            return fault_answer(
                QboError(
                    "1050",
                    "Invalid Content Type",
                    "An upload must be Content-Type: multipart/form-data",
                    status=415,
                ),
                as_json,
            )
        length = int(request.headers.get("content-length") or 0)
        if length > UPLOAD_MAX_BYTES:
            return fault_answer(
                QboError(
                    "6030",
                    "Upload request size exceeds allowed limit",
                    "The file upload request should not exceed 100MB in "
                    f"size. The current request size is {length}",
                ),
                as_json,
            )
        form = await request.form()
        files: dict[str, tuple[UploadFile, Any]] = {}
        metadata: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name.startswith("file_content_") and isinstance(value, UploadFile):
                files[name.removeprefix("file_content_")] = (value, None)
            elif name.startswith("file_metadata_"):
                metadata[name.removeprefix("file_metadata_")] = value
        if not files:
            await form.close()
            return fault_answer(missing("file_content_01"), as_json)
        prepared: list[tuple[dict[str, Any] | QboError, int]] = []
        for suffix, (part, _) in sorted(files.items()):
            size = part.size if part.size is not None else len(await part.read())
            raw_meta = metadata.get(suffix)
            if isinstance(raw_meta, UploadFile):
                raw_meta = (await raw_meta.read()).decode("utf-8", "replace")
            meta: Any = {}
            if raw_meta:
                try:
                    meta = json.loads(raw_meta)
                except ValueError:
                    meta = None
            if not isinstance(meta, dict):
                prepared.append(
                    (
                        QboError(
                            "6040",
                            "The file metadata must be of Attachable type",
                            "The file metadata "
                            f"submitted must be of Attachable type. request parameter: file_metadata_"
                            f"{suffix}",
                        ),
                        0,
                    )
                )
                continue
            prepared.append(
                (
                    {
                        **meta,
                        "FileName": meta.get("FileName") or part.filename or f"file_{suffix}",
                        "ContentType": meta.get("ContentType")
                        or part.content_type
                        or "application/octet-stream",
                    },
                    size,
                )
            )
        await form.close()
        results: list[dict[str, Any]] = []
        with store.lock:
            ledger = store.ledger(realm_id)
            now = store.now()
            for upload_body, size in prepared:
                if isinstance(upload_body, QboError):
                    results.append({"Fault": upload_body.fault()})
                    continue
                try:
                    document = books.create(ledger, "Attachable", upload_body, now)
                except QboError as error:
                    results.append({"Fault": error.fault()})
                    continue
                document.update(Size=size, FileAccessUri=f"/v3/company/{realm_id}/download/{document['Id']}")
                results.append({"Attachable": document})
            store.books_changed()
        return _render({"AttachableResponse": results, "time": stamp()}, 200, as_json)

    def report_response(
        operation: Operation, request: Request, as_json: bool, tid: str, realm_id: str, client_id: str
    ) -> Response:
        name = operation.report or ""
        if name not in reports.REPORTS:
            error = unsupported_operation(f"Operation Report {name} is not supported.")
            return send(fault_answer(error, as_json), tid)
        params = dict(request.query_params)
        rows = store.config.report_rows
        today = company_date(store.now())
        head = reports.header(name, params, today, stamp(), rows)
        columns = reports.columns(name)
        sections = reports.sections(name, params, today, rows)

        def chunks() -> Iterator[str]:
            if as_json:
                yield (
                    '{"Header":'
                    + json.dumps(head, separators=(",", ":"))
                    + ',"Columns":'
                    + json.dumps(columns, separators=(",", ":"))
                    + (',"Rows":{"Row":[' if rows else ',"Rows":{}')
                )
            else:
                yield (
                    f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Report '
                    f'xmlns="{_XMLNS}">'
                    + xml_element("Header", head)
                    + xml_element("Columns", columns)
                    + "<Rows>"
                )
            first = True
            buffer: list[str] = []
            size = 0
            for section in sections:
                text = json.dumps(section, separators=(",", ":")) if as_json else xml_element("Row", section)
                if as_json and not first:
                    text = "," + text
                first = False
                buffer.append(text)
                size += len(text)
                if size >= 64 * 1024:
                    yield "".join(buffer)
                    buffer, size = [], 0
            if buffer:
                yield "".join(buffer)
            if as_json:
                yield "]}}" if rows else "}"
            else:
                yield "</Rows></Report>"

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks():
                yield chunk.encode()
                await asyncio.sleep(0)  # let other requests run between chunks

        return _ReleasingStream(
            lambda: store.traffic.leave(realm_id, client_id),
            body(),
            media_type=_JSON if as_json else _XML,
            headers={"intuit_tid": tid},
        )

    return router


class _ReleasingStream(StreamingResponse):
    """A streamed answer that counts as in flight until its last byte is sent (or it fails)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _request_id_too_long(value: str) -> QboError:
    return business(
        f"You cannot enter more than {REQUEST_ID_MAX} characters in the request_id "
        f"field. You tried entering {value[:10]}..., which is {len(value)} "
        "characters."
    )
