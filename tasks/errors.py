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


class RangeNotServedError(PermanentSourceError):
    """The source can't serve this interval over this range (e.g. Yahoo 1m bars older than 30 days)."""


class TransientSourceError(SourceError):
    """The source is busy or flaky (5xx, timeout, HTML instead of JSON): worth a retry."""

    transient = True

    def __init__(self, source: str, symbol: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(source, symbol, message)
        self.retry_after = retry_after


class RateLimitedError(TransientSourceError):
    """The source said we are too fast (Yahoo 429, an Alpha Vantage `Note`): back off, then retry."""


class QuotaExhaustedError(SourceError):
    """The source's daily quota is used up: the symbol is deferred to the next run, not failed."""


class HistoryUnavailableError(MarketpipeError):
    """The store could not say what it holds for a symbol, so none of its bars went on to be
    processed: the symbol fails, and the next run collects it again."""

    def __init__(self, symbol: str, cause: Exception, fetched: bool) -> None:
        self.symbol = symbol
        done = "its collected bars were not processed" if fetched else "nothing was fetched"
        super().__init__(
            f"the store could not give the history the indicators need ({cause}): {done}; the next run collects "
            f"{symbol} again once the store answers (intraday bars only while the source still serves them)"
        )
