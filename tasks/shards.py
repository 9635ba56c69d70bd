"""Shards: one run's symbols split across flow runs (on Kubernetes, one Job each), and the source's limits with them.

A shard's pacer sees only its own requests: its pod may run on another node, with no state file in
common with the others. So each of N shards paces at 1/N of every configured limit (the hourly rate,
the per-minute rate, the burst, the daily quota and the per-second window bound), rounded down, and
keeps that pace in a state file of its own. N shards together then never exceed what one run was
allowed, and a shard never reads or rewrites another's state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from configs.settings import ConfigError, SourceSettings
from tasks.errors import UsageError

_SHARD = re.compile(r"^([1-9][0-9]*)-of-([1-9][0-9]*)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (from 1) of ``count``, written ``2-of-4`` in parameters and flow-run names."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            last = f"{self.count}-of-{self.count}"
            raise UsageError(f"shard {self.index}-of-{self.count} does not exist: use 1-of-{self.count} up to {last}")

    @staticmethod
    def parse(text: str) -> Shard:
        """``2-of-4`` -> Shard(2, 4); anything else is a usage error that shows the form."""
        match = _SHARD.fullmatch(text.strip())
        if match is None:
            raise UsageError(f"shard {text!r} is not of the form K-of-N, e.g. 2-of-4")
        return Shard(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"

    def state_key(self, source: str) -> str:
        """The name of this shard's pacing state file (without .json): never shared with another shard."""
        return f"{source}.shard-{self}"


def partition(symbols: list[str], shards: int) -> list[list[str]]:
    """Contiguous chunks of ``symbols`` in their order, sizes differing by at most one.

    The same symbols and count always give the same shards, so a shard's retry covers the same
    symbols. Never more shards than symbols: an empty shard would be a Job that does nothing.
    """
    if shards < 1:
        raise UsageError(f"shards must be at least 1 (got {shards})")
    count = min(shards, len(symbols))
    size, extra = divmod(len(symbols), count) if count else (0, 0)
    chunks: list[list[str]] = []
    first = 0
    for number in range(count):
        last = first + size + (1 if number < extra else 0)
        chunks.append(symbols[first:last])
        first = last
    return chunks


def shard_limits(name: str, settings: SourceSettings, shard: Shard) -> SourceSettings:
    """The source's settings with every limit cut to this shard's share, 1/N rounded down.

    A limit too small to give each shard at least one request is a config error naming the key:
    rounding it up would let the shards together exceed it.
    """
    count = shard.count
    if count == 1:
        return settings

    def share(key: str, value: int) -> int:
        part = value // count
        if part < 1:
            raise ConfigError(
                f"data_sources.{name}.{key} is {value}, too few to split into {count} shards (each needs at "
                f"least 1): run at most {value} shard(s), or raise the limit if the source allows it"
            )
        return part

    return settings.model_copy(
        update={
            "rate_limit": share("rate_limit", settings.rate_limit),
            "requests_per_minute": None
            if settings.requests_per_minute is None
            else share("requests_per_minute", settings.requests_per_minute),
            "requests_per_day": None
            if settings.requests_per_day is None
            else share("requests_per_day", settings.requests_per_day),
            "burst": max(1, settings.burst // count),
        }
    )


def shard_window(per_window: int | None, shard: Shard) -> int | None:
    """A shard's share of the arrivals one second may hold; None where a share is under one.

    Below one a second, a shard's slots are planned from its real send times at its own (split)
    rate, so each shard sends at most one request in any second.
    """
    if per_window is None or shard.count == 1:
        return per_window
    part = per_window // shard.count
    return part if part >= 1 else None
