"""Exceptions that cross module boundaries, grouped by what the caller should do about them."""

from __future__ import annotations


class MarketpipeError(Exception):
    """Base class: every error marketpipe raises on purpose."""


class UsageError(MarketpipeError):
    """The user asked for something impossible (bad symbol, bad date range): exit code 2."""


class InvalidSymbolError(UsageError):
    """A symbol failed the pattern check, so no request was sent for it."""


class SourceError(MarketpipeError):
    """A data source could not deliver bars for one symbol."""

    transient: bool = False

    def __init__(self, source: str, symbol: str, message: str) -> None:
        self.source = source
        self.symbol = symbol
        self.message = message
        super().__init__(f"{source} {symbol}: {message}")


class PermanentSourceError(SourceError):
    """Retrying will not help: the symbol is unknown, delisted or the range does not exist."""


class TransientSourceError(SourceError):
    """The source is busy or flaky (429, 5xx, timeout, HTML instead of JSON): worth a retry."""

    transient = True
