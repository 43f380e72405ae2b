"""The token endpoint's JSON shape."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class AccessTokenOut(BaseModel):
    access_token: str
    token_type: str
    expires_at: datetime
    realm_id: str
    api_base_url: str
