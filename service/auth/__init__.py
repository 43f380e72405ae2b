"""Who is calling: cieTrade users (JWTs) and internal services (API keys)."""
