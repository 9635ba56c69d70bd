"""What a drill measures: bars expected against bars stored, and the table `make drills` prints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

BAR_KEY = ["symbol", "interval", "source", "time"]


@dataclass(frozen=True)
class DrillResult:
    drill: str
    faults_injected: int
    faults_survived: int
    bars_expected: int
    bars_stored: int
    points_lost: int  # expected bars missing from the store
    stored_twice: int  # keys stored more than once
    differing: int  # bars stored with another value than the run without faults stored
    seconds: float
    notes: str = ""


@dataclass(frozen=True)
class Comparison:
    expected: int
    stored: int
    lost: int
    twice: int
    differing: int


def compare(expected: pd.DataFrame, stored: pd.DataFrame) -> Comparison:
    """Stored bars against a run without faults: by key, then every value (NaN equal to NaN, else exact)."""
    twice = int(stored.duplicated(BAR_KEY).sum())
    columns = [c for c in expected.columns if c not in BAR_KEY]
    joined = expected.merge(
        stored.drop_duplicates(BAR_KEY), on=BAR_KEY, how="left", suffixes=("", "_stored"), indicator=True
    )
    lost = int((joined["_merge"] == "left_only").sum())
    present = joined.loc[joined["_merge"] == "both"]
    differs = np.zeros(len(present), dtype=bool)
    for column in columns:
        if f"{column}_stored" not in present:
            differs |= present[column].notna().to_numpy()
            continue
        want, got = present[column], present[f"{column}_stored"]
        equal = (want == got) | (want.isna() & got.isna())
        differs |= ~equal.to_numpy(dtype=bool)
    return Comparison(len(expected), len(stored), lost, twice, int(differs.sum()))


def table(results: list[DrillResult]) -> str:
    """A Markdown table, as the README carries it."""
    header = (
        "| drill | faults injected | survived | bars expected | bars stored "
        "| points lost | stored twice | differing | time |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    rows = [
        f"| {r.drill} | {r.faults_injected} | {r.faults_survived} | {r.bars_expected:,} | {r.bars_stored:,} "
        f"| {r.points_lost} | {r.stored_twice} | {r.differing} | {r.seconds:.0f} s |"
        for r in results
    ]
    return "\n".join([header, rule, *rows])
