"""What can go wrong talking to Intuit, named after the OAuth errors Intuit returns."""

from __future__ import annotations


class IntuitError(Exception):
    """Base class. `intuit_tid` is Intuit's transaction id, for support; never a secret."""

    def __init__(self, message: str, *, intuit_tid: str | None = None) -> None:
        super().__init__(message)
        self.intuit_tid = intuit_tid


class InvalidGrant(IntuitError):
    """The code or refresh token is dead: used, rotated, revoked or expired.

    `after_lost_response` is true when an earlier attempt of the same request lost its answer:
    Intuit probably rotated the token then, and the new one is gone.
    """

    def __init__(
        self, message: str, *, intuit_tid: str | None = None, after_lost_response: bool = False
    ) -> None:
        super().__init__(message, intuit_tid=intuit_tid)
        self.after_lost_response = after_lost_response


class InvalidClient(IntuitError):
    """Intuit refused the app's client id or secret."""


class InvalidToken(IntuitError):
    """An access token was refused by userinfo or the accounting API."""


class IntuitUnavailable(IntuitError):
    """Intuit could not be reached, timed out, or answered 429/5xx. Nothing was changed locally.

    `maybe_processed` is true when the request may have reached Intuit before the answer was lost.
    """

    def __init__(
        self,
        message: str,
        *,
        intuit_tid: str | None = None,
        retry_after: int | None = None,
        maybe_processed: bool = False,
    ) -> None:
        super().__init__(message, intuit_tid=intuit_tid)
        self.retry_after = retry_after
        self.maybe_processed = maybe_processed


class IntuitProtocolError(IntuitError):
    """Intuit answered in a shape the broker does not understand."""


class InvalidIdToken(IntuitError):
    """The id_token that came with a code exchange failed verification (signature, iss, aud,
    exp, nonce), or names another user than userinfo."""
