"""The baseline for bench/status_token.py: the same two lookups as the broker's GET /status and
GET /connections/{id}/token, written as plainly as possible (Starlette + an asyncpg pool, no
ORM, no validation, no authentication), so the broker's own overhead shows against it.

Run by the benchmark as `python -m uvicorn raw_app:create_app --factory --app-dir bench`, with
DATABASE_URL, BROKER_ENCRYPTION_KEYS and INTUIT_API_BASE_URL in the environment.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.core.crypto import SecretBox
from service.core.db.engine import asyncpg_dsn

STATUS_SQL = """
SELECT id, status, realm_id, company_name, owner_user_id, owner_qb_sub, owner_qb_email,
       owner_qb_name, module_ar, module_ap, access_token_expires_at
FROM connections WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC
"""
TOKEN_SQL = "SELECT id, access_token, access_token_expires_at, realm_id FROM connections WHERE id = $1"


def _keys(setting: str) -> list[tuple[str, bytes]]:
    pairs = (entry.strip().partition(":") for entry in setting.split(","))
    return [(kid, base64.b64decode(key)) for kid, _, key in pairs]


def _status_item(row: asyncpg.Record) -> dict[str, Any]:
    enabled = row["status"] == "connected" and (row["module_ar"] or row["module_ap"])
    owner = (
        None
        if row["owner_qb_sub"] is None
        else {
            "user_id": row["owner_user_id"],
            "quickbooks_user": {
                "sub": row["owner_qb_sub"],
                "email": row["owner_qb_email"],
                "name": row["owner_qb_name"],
            },
        }
    )
    expires = row["access_token_expires_at"]
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "realm_id": row["realm_id"],
        "company_name": row["company_name"],
        "owner": owner,
        "modules": {"accounts_receivable": row["module_ar"], "accounts_payable": row["module_ap"]},
        "accounting_link": "enabled" if enabled else "disabled",
        "access_token_expires_at": expires.isoformat() if expires else None,
    }


def create_app() -> Starlette:
    box = SecretBox(_keys(os.environ["BROKER_ENCRYPTION_KEYS"]))
    api_base_url = os.environ.get("INTUIT_API_BASE_URL", "")
    pool: asyncpg.Pool | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        # Sized like the broker's engine: pool_size 10, max_overflow 10.
        pool = await asyncpg.create_pool(asyncpg_dsn(os.environ["DATABASE_URL"]), min_size=10, max_size=20)
        try:
            yield
        finally:
            await pool.close()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def status(request: Request) -> JSONResponse:
        assert pool is not None
        tenant = request.query_params["tenant_id"]
        items = [_status_item(row) for row in await pool.fetch(STATUS_SQL, tenant)]
        overall = "enabled" if any(i["accounting_link"] == "enabled" for i in items) else "disabled"
        return JSONResponse({"tenant_id": tenant, "accounting_link": overall, "connections": items})

    async def token(request: Request) -> JSONResponse:
        assert pool is not None
        connection_id = uuid.UUID(request.path_params["connection_id"])
        row = await pool.fetchrow(TOKEN_SQL, connection_id)
        if row is None:
            return JSONResponse({"detail": "no such connection"}, status_code=404)
        access = box.decrypt(row["access_token"], f"{row['id']}:access")
        return JSONResponse(
            {
                "access_token": access,
                "token_type": "bearer",
                "expires_at": row["access_token_expires_at"].isoformat(),
                "realm_id": row["realm_id"],
                "api_base_url": api_base_url,
            },
            headers={"Cache-Control": "no-store"},
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/status", status),
            Route("/connections/{connection_id}/token", token),
        ],
        lifespan=lifespan,
    )
