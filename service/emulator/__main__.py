"""`python -m service.emulator`: run the Intuit emulator with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from .app import create_app
from .config import EmulatorSettings


def main(argv: list[str] | None = None) -> None:
    defaults = EmulatorSettings()
    parser = argparse.ArgumentParser(
        prog="python -m service.emulator", description="Run the local Intuit emulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--public-url", help="its own base URL (default http://HOST:PORT)")
    parser.add_argument(
        "--internal-url",
        help="base URL for the token, revoke, userinfo and "
        "JWKS endpoints in the discovery document (default: the public URL)",
    )
    parser.add_argument("--client-id", default=defaults.client_id)
    parser.add_argument("--client-secret", default=defaults.client_secret)
    parser.add_argument(
        "--redirect-uri",
        action="append",
        dest="redirect_uris",
        help="a registered redirect URI, matched byte for byte (repeatable)",
    )
    parser.add_argument("--state-file", help="persist users, grants and tokens as JSON here")
    parser.add_argument("--access-token-ttl", type=int, default=defaults.access_token_ttl)
    parser.add_argument("--refresh-token-ttl", type=int, default=defaults.refresh_token_ttl)
    parser.add_argument("--code-ttl", type=int, default=defaults.code_ttl)
    parser.add_argument("--latency-ms", type=int, default=defaults.latency_ms)
    parser.add_argument("--app-name", default=defaults.app_name)
    parser.add_argument("--no-seed", action="store_true", help="start without the demo users")
    parser.add_argument("--webhook-url", help="send Intuit's webhooks of data changes here")
    parser.add_argument("--webhook-verifier-token", help="the verifier token that signs them")
    parser.add_argument(
        "--webhook-format", choices=["legacy", "cloudevents", "both"], default=defaults.webhook_format
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    settings = EmulatorSettings(
        public_url=args.public_url or f"http://{args.host}:{args.port}",
        internal_url=args.internal_url,
        client_id=args.client_id,
        client_secret=args.client_secret,
        redirect_uris=args.redirect_uris or defaults.redirect_uris,
        state_file=args.state_file,
        access_token_ttl=args.access_token_ttl,
        refresh_token_ttl=args.refresh_token_ttl,
        code_ttl=args.code_ttl,
        latency_ms=args.latency_ms,
        app_name=args.app_name,
        seed=not args.no_seed,
        webhook_url=args.webhook_url,
        webhook_verifier_token=args.webhook_verifier_token,
        webhook_format=args.webhook_format,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
