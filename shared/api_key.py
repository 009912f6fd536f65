"""The service's API key: one rule for the service that checks it and the clients that send it.

Keys usually come from the environment, often filled from a secret file that ends in a newline.
An HTTP header cannot carry control or non-ASCII characters, so a key holding them could never
be sent: refuse it at start-up, and never echo the key (the message ends up in logs).
"""

from __future__ import annotations

from shared.errors import UserError


def clean_api_key(raw: str | None, source: str) -> str:
    """``raw`` without surrounding whitespace; a one-line :class:`UserError` naming ``source``
    when nothing is left or what is left cannot travel in an ``Authorization`` header."""
    key = (raw or "").strip()
    if not key:
        raise UserError(f"{source}: the API key is empty or unset")
    if not (key.isascii() and key.isprintable()):
        raise UserError(
            f"{source}: the API key holds control or non-ASCII characters (not shown here); "
            "an HTTP header cannot carry them"
        )
    return key
