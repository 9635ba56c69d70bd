"""Restatements: when a source has rewritten the past, the stored series must be rewritten with it.

Yahoo's prices are split-adjusted and its ``adj_close`` dividend-adjusted as of the day they are
served (Alpha Vantage's adjusted series likewise). After a split or an ex-dividend date, every
earlier bar changes. An incremental run collects only the newest bars, so without a restatement
the store holds two scales side by side, and returns and indicators jump at the seam.

A run restates when it sees either sign:

- a corporate action newer than the stored history's start that the store does not hold yet;
- an overlap bar whose ``close`` or ``adj_close`` differs from the stored one by more than
  :data:`RELATIVE_TOLERANCE` (the source re-rounding its decimals is not a restatement).

The collect step then re-collects the series from its first stored bar, and the run rewrites it
whole, so the store equals one full run over the whole range.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.bars import FLAG_MISSING
from tasks.processing.ticks import FLAG_UNIT_REPAIRED, to_major_unit

RELATIVE_TOLERANCE = 1e-6
COMPARED = ("close", "adj_close")
# Stored values these flags mark were changed by our own repairs, so they can't be compared with the source's.
REPAIR_FLAGS = (FLAG_MISSING, FLAG_UNIT_REPAIRED)


def restatement_reason(
    collected: pd.DataFrame,
    actions: pd.DataFrame,
    currency: str | None,
    stored: pd.DataFrame,
    stored_actions: pd.DataFrame,
    first_stored: pd.Timestamp,
) -> str | None:
    """Why the stored series must be restated, or None.

    ``collected`` and ``actions`` are what the source sent now (raw units, ``currency`` as it
    said); ``stored`` holds the stored bars over the same dates and ``stored_actions`` the stored
    corporate actions; ``first_stored`` is the series' first stored bar.
    """
    new_action = _new_action(actions, stored_actions, first_stored)
    if new_action is not None:
        return new_action
    return _changed_overlap(to_major_unit(collected, currency)[0], stored)


def _new_action(actions: pd.DataFrame, stored_actions: pd.DataFrame, first_stored: pd.Timestamp) -> str | None:
    if actions.empty:
        return None
    known = set(zip(stored_actions["time"], stored_actions["kind"], strict=True)) if not stored_actions.empty else set()
    ordered = actions.sort_values("time", kind="stable")
    for when, kind, ratio, amount in zip(
        pd.DatetimeIndex(ordered["time"]), ordered["kind"], ordered["ratio"], ordered["amount"], strict=True
    ):
        if when > first_stored and (when, kind) not in known:
            return f"a {_describe(str(kind), float(ratio), float(amount))} on {when.date()} restates the stored history"
    return None


def _describe(kind: str, ratio: float, amount: float) -> str:
    if kind == "split" and np.isfinite(ratio):
        return f"{ratio:g}-for-1 split"
    if np.isfinite(amount):
        return f"{kind.replace('_', ' ')} of {amount:g}"
    return kind.replace("_", " ")


def _changed_overlap(collected: pd.DataFrame, stored: pd.DataFrame) -> str | None:
    if collected.empty or stored.empty:
        return None
    clean = stored
    for flag in REPAIR_FLAGS:
        if flag in clean.columns:
            clean = clean.loc[clean[flag].fillna(0.0) == 0.0]
    both = clean.merge(collected, on="time", suffixes=("_stored", ""))
    for column in COMPARED:
        old = both[f"{column}_stored"].to_numpy(dtype=np.float64)
        new = both[column].to_numpy(dtype=np.float64)
        valid = np.isfinite(old) & np.isfinite(new) & (old != 0)
        relative = np.abs(new[valid] / old[valid] - 1.0)
        if relative.size and relative.max() > RELATIVE_TOLERANCE:
            worst = int(np.argmax(relative))
            when = both["time"].to_numpy()[valid][worst]
            return (
                f"the source's {column} of {pd.Timestamp(when).date()} changed from {old[valid][worst]:.6g} "
                f"to {new[valid][worst]:.6g}, restating the stored history"
            )
    return None
