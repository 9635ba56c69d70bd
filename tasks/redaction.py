"""Secrets out of what we print: query parameters that carry keys, in URLs and request logs."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_PARAMS = frozenset({"apikey", "api_key", "token", "password", "key"})
URL_IN_TEXT = re.compile(r"https?://\S+")


def redact_params(params: dict[str, str]) -> dict[str, str]:
    """The query parameters with secret values replaced by ``***``."""
    return {k: _shown(k, v) for k, v in params.items()}


def redact_url(url: str) -> str:
    """The URL with its password and secret query parameters replaced, for logs and error messages."""
    parts = urlsplit(url)
    query = [(k, _shown(k, v)) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}")
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def _shown(key: str, value: str) -> str:
    return "***" if key.lower() in SECRET_PARAMS else value


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted: for messages that leave the process (log lines, alerts)."""
    return URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text
