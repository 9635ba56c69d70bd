"""The one contract every processing step keeps: the bars in, the bars out and what it counted.

A step takes the frame and the :class:`Series` it belongs to (whatever else it needs is there),
and returns a :class:`Stepped`. It never changes the frame it was given, and it counts what it
did under names of its own (``out_of_order``, ``missing_dropped``, a validation rule ...);
:mod:`tasks.processing.pipeline` says which summary column each name goes to. A step that takes
bars out of the series for good (validation) hands them back as ``aside``, with their reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from configs.indicators import IndicatorSpec
from configs.settings import QualitySettings

Counts = dict[str, int]


@dataclass(frozen=True)
class Series:
    """What a step knows of the series besides its bars."""

    symbol: str
    interval: str
    quality: QualitySettings
    indicators: Sequence[IndicatorSpec]
    calendar: str | None  # the exchange calendar's name (XNYS ...), None: not known
    currency: str | None  # as the source quotes it (GBp for pence)
    now: datetime | None = None  # None: the clock; what counts as a bar from the future
    stored: int = 0  # rows of stored history ahead of the new bars (0 until the history joins)


@dataclass(frozen=True)
class Stepped:
    """What a step made of the frame."""

    frame: pd.DataFrame
    counts: Counts = field(default_factory=dict)
    aside: pd.DataFrame | None = None  # bars taken out of the series, with ``rule`` and ``reason``


class Step(Protocol):
    __name__: str

    def __call__(self, frame: pd.DataFrame, series: Series, /) -> Stepped: ...


def extended(frame: pd.DataFrame, columns: Mapping[str, npt.NDArray[np.float64]]) -> pd.DataFrame:
    """A new frame: ``frame`` with ``columns`` set, as ``frame.assign(**columns)`` sets them.

    New float64 columns join as one block in one concat, which shares the frame's columns rather
    than copying them (Copy-on-Write): pandas' insert of each column costs more than the values.
    """
    replaced = any(c in frame.columns for c in columns)
    if not columns or replaced or any(v.dtype != np.float64 for v in columns.values()):
        return frame.assign(**columns)
    stacked = np.vstack(list(columns.values())).T  # new, and no one else's: the frame may keep it
    block = pd.DataFrame(stacked, index=frame.index, columns=list(columns), copy=False)
    return pd.concat([frame, block], axis=1)
