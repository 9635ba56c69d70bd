"""`collection.processes`: worker processes compute what the run's threads compute, and a dead one loses nothing."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import datetime

import pandas as pd
import pytest

from configs.indicators import IndicatorSpec, default_indicators
from configs.settings import CollectionSettings, QualitySettings
from tasks import process_pool
from tasks.processing.pipeline import Processed, process
from tasks.sources.base import Collected
from tests.test_processing import NOW, bars


@pytest.fixture
def pool() -> Iterator[None]:
    process_pool.start(1)
    try:
        yield
    finally:
        process_pool.stop()


def _arguments() -> tuple[Collected, str, str, QualitySettings, list[IndicatorSpec], None, datetime]:
    frame = bars(300)
    frame.loc[[5, 50, 51], "high"] = float("nan")  # kept, counted, and blanking the indicators that read it
    frame.loc[90, "low"] = float(frame["high"].iloc[90]) * 1.5  # quarantined
    return (Collected(frame), "TEST", "1d", QualitySettings(missing="keep"), default_indicators(), None, NOW)


def _same(a: Processed, b: Processed) -> None:
    pd.testing.assert_frame_equal(a.bars, b.bars)
    pd.testing.assert_frame_equal(a.quarantined, b.quarantined)
    assert (a.rejected, a.repaired, a.flagged, a.dropped, a.gaps) == (
        b.rejected,
        b.repaired,
        b.flagged,
        b.dropped,
        b.gaps,
    )


def test_a_worker_process_computes_what_the_calling_thread_computes(pool: None) -> None:
    assert process_pool.running()
    in_pool = process_pool.run(process, *_arguments())
    here = process(*_arguments())
    _same(in_pool, here)
    assert not in_pool.bars.empty and in_pool.rejected  # the quarantined bar came back too


def test_a_dead_worker_leaves_the_run_processing_in_its_threads(pool: None) -> None:
    process_pool.run(os.getpid)  # the worker is up
    workers = process_pool.worker_pids()
    assert workers and os.getpid() not in workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    result = process_pool.run(process, *_arguments())  # the broken pool is noticed and left
    _same(result, process(*_arguments()))
    assert not process_pool.running()
    assert process_pool.run(os.getpid) == os.getpid()  # from then on, here


def test_processes_default_to_the_threads_and_are_validated() -> None:
    assert CollectionSettings().processes == 0
    assert CollectionSettings(processes=2).processes == 2
    with pytest.raises(ValueError, match="processes"):
        CollectionSettings(processes=-1)
