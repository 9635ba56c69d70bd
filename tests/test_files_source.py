"""The vendor-files source against real vendor dumps copied into temporary directories."""

from __future__ import annotations

import csv
import gzip
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs.settings import ConfigError
from tasks.bars import BAR_COLUMNS, FLAG_MISSING, conform
from tasks.errors import PermanentSourceError
from tasks.sources.base import BarQuery, Collected, load_source
from tasks.sources.files import VendorFiles, VendorFilesSettings, holds_symbol
from tests.conftest import FIXTURES, YAHOO

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

EURGBP = YAHOO / "yahoo-finance2_v7download_EURGBP=X_2019-09_1d_csv_with_null_rows.csv"
MSFT_DIVIDENDS = YAHOO / "yahoo-finance2_v7download_MSFT_dividends_2021-02_2022-01.csv"
NVDA_SPLITS = YAHOO / "yahoo-finance2_v7download_NVDA_splits_2021-02_2022-01.csv"
AV_EXTENDED = FIXTURES / "alphavantage" / "romeltorres_TIME_SERIES_INTRADAY_EXTENDED_csv_2020-12.csv"
SPY = FIXTURES / "csv" / "pandas-ta_SPY_D_1999-11-01_2020-08-28.csv"
WIDE = (date(1990, 1, 1), date(2030, 12, 31))

STANDARD_CSV = """time,symbol,interval,source,open,high,low,close,adj_close,volume
2024-01-02T00:00:00+00:00,AAPL,1d,yahoo_finance,187.15,188.44,183.89,185.64,184.94,82488700
2024-01-03T00:00:00+00:00,AAPL,1d,yahoo_finance,184.22,185.88,183.43,184.25,183.55,58414500
2024-01-03T00:00:00+00:00,MSFT,1d,yahoo_finance,369.01,373.26,368.51,370.60,368.01,23083500
2024-01-03T14:30:00+00:00,AAPL,1m,yahoo_finance,184.22,184.50,184.10,184.30,,120000
2024-01-04T00:00:00+00:00,AAPL,1d,yahoo_finance,182.15,183.09,180.88,181.91,181.22,71983600
"""


def rows(path: Path) -> list[dict[str, str]]:
    """The fixture read with the csv module, independently of the code under test."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def source(directory: Path) -> VendorFiles:
    return VendorFiles(VendorFilesSettings(path=str(directory)))


def collect(directory: Path, symbol: str, interval: str = "1d", window: tuple[date, date] = WIDE) -> Collected:
    return source(directory).collect(BarQuery(symbol, interval, *window))


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


@pytest.fixture
def vendor_dir(tmp_path: Path) -> Path:
    """A backfill directory as a user would lay it out, fixtures renamed to their symbols."""
    shutil.copy(EURGBP, tmp_path / "EURGBP=X.csv")
    shutil.copy(MSFT_DIVIDENDS, tmp_path / "MSFT.dividends.csv")
    shutil.copy(NVDA_SPLITS, tmp_path / "NVDA.splits.csv")
    shutil.copy(AV_EXTENDED, tmp_path / "IBM.csv")
    shutil.copy(SPY, tmp_path / "spy.CSV")
    (tmp_path / "AAPL.csv").write_text(STANDARD_CSV)
    (tmp_path / "notes.txt").write_text("not a vendor file\n")
    return tmp_path


def test_load_source_finds_the_module(tmp_path: Path) -> None:
    loaded = load_source("files", VendorFilesSettings(path=str(tmp_path)))
    assert isinstance(loaded, VendorFiles)
    assert loaded.name == "files"


def test_yahoo_csv_flags_null_rows_and_keeps_exact_values(vendor_dir: Path) -> None:
    expected = [r for r in rows(EURGBP) if r["Close"] != "null"]
    assert len(rows(EURGBP)) == 25
    assert len(expected) == 5

    got = collect(vendor_dir, "EURGBP=X")

    assert got.requests == 1
    assert len(got.bars) == 25
    assert got.bars[FLAG_MISSING].sum() == 20
    bars = got.bars.loc[got.bars[FLAG_MISSING] == 0.0]
    assert list(bars.columns[: len(BAR_COLUMNS)]) == list(BAR_COLUMNS)
    assert list(bars["time"]) == [utc(r["Date"]) for r in expected]
    assert list(bars["close"]) == [float(r["Close"]) for r in expected]
    assert list(bars["open"]) == [float(r["Open"]) for r in expected]
    assert list(bars["adj_close"]) == [float(r["Adj Close"]) for r in expected]
    assert list(bars["volume"]) == [0.0] * 5
    assert set(bars["symbol"]) == {"EURGBP=X"}
    assert set(bars["interval"]) == {"1d"}
    assert set(bars["source"]) == {"files"}
    assert list(bars[FLAG_MISSING]) == [0.0] * 5
    assert str(bars["time"].dtype) == "datetime64[ns, UTC]"


def test_partly_null_rows_are_kept_and_flagged(tmp_path: Path) -> None:
    (tmp_path / "X.csv").write_text(
        "Date,Open,High,Low,Close,Adj Close,Volume\n"
        "2020-01-02,1.5,1.6,1.4,1.55,1.55,100\n"
        "2020-01-03,1.5,1.6,1.4,1.52,1.52,null\n"
        "2020-01-06,null,null,null,null,null,null\n"
        "2020-01-07,,,,,,\n"
    )
    got = collect(tmp_path, "X")
    assert len(got.bars) == 4
    assert list(got.bars["close"])[:2] == [1.55, 1.52]
    assert got.bars["close"].iloc[2:].isna().all()
    assert list(got.bars[FLAG_MISSING]) == [0.0, 1.0, 1.0, 1.0]
    assert np.isnan(got.bars["volume"].iloc[1])


def test_dividends_file_gives_actions_and_no_bars(vendor_dir: Path) -> None:
    got = collect(vendor_dir, "MSFT", window=(date(2021, 2, 1), date(2022, 1, 31)))
    assert got.bars.empty
    actions = got.actions
    assert list(actions["time"]) == [utc(d) for d in ("2021-02-17", "2021-05-19", "2021-08-18", "2021-11-17")]
    assert list(actions["amount"]) == [0.56, 0.56, 0.56, 0.62]
    assert set(actions["kind"]) == {"dividend"}
    assert set(actions["symbol"]) == {"MSFT"}
    assert set(actions["source"]) == {"files"}
    assert actions["ratio"].isna().all()


def test_actions_outside_the_window_are_left_out(vendor_dir: Path) -> None:
    got = collect(vendor_dir, "MSFT", window=(date(2021, 5, 19), date(2021, 8, 17)))
    assert list(got.actions["time"]) == [utc("2021-05-19")]


def test_split_file_gives_the_ratio(vendor_dir: Path) -> None:
    got = collect(vendor_dir, "NVDA", window=(date(2021, 2, 1), date(2022, 1, 31)))
    assert got.bars.empty
    assert list(got.actions["time"]) == [utc("2021-07-20")]
    assert list(got.actions["kind"]) == ["split"]
    assert list(got.actions["ratio"]) == [4.0]
    assert got.actions["amount"].isna().all()


@pytest.mark.parametrize(("cell", "ratio"), [("1:10", 0.1), ("3/2", 1.5), ("2", 2.0)])
def test_split_ratio_forms(tmp_path: Path, cell: str, ratio: float) -> None:
    (tmp_path / "X.splits.csv").write_text(f"Date,Stock Splits\n2020-03-02,{cell}\n")
    assert list(collect(tmp_path, "X").actions["ratio"]) == [ratio]


@pytest.mark.parametrize("cell", ["four:one", "4:0", "-2:1"])
def test_bad_split_ratio_is_refused(tmp_path: Path, cell: str) -> None:
    (tmp_path / "X.splits.csv").write_text(f"Date,Stock Splits\n2020-03-02,{cell}\n")
    with pytest.raises(PermanentSourceError, match=r"X\.splits\.csv.*Stock Splits"):
        collect(tmp_path, "X")


def test_bars_and_actions_from_several_files_are_merged(vendor_dir: Path) -> None:
    shutil.copy(EURGBP, vendor_dir / "MSFT.csv")
    got = collect(vendor_dir, "MSFT", window=(date(2019, 9, 1), date(2021, 12, 31)))
    assert len(got.bars) == 25
    assert got.bars["close"].notna().sum() == 5
    assert set(got.bars["symbol"]) == {"MSFT"}
    assert len(got.actions) == 4
    assert got.requests == 2


def test_alpha_vantage_extended_csv_comes_out_oldest_first(vendor_dir: Path) -> None:
    expected = rows(AV_EXTENDED)
    assert len(expected) == 11190

    bars = collect(vendor_dir, "IBM", "1m").bars

    assert len(bars) == 11190
    assert bars["time"].is_monotonic_increasing
    assert bars["time"].iloc[0] == utc("2020-11-23 04:01:00")  # naive times are read as UTC
    assert bars["time"].iloc[-1] == utc("2020-12-18 20:00:00")
    newest_first = list(reversed(expected))
    assert list(bars["close"]) == [float(r["close"]) for r in newest_first]
    assert list(bars["volume"]) == [float(r["volume"]) for r in newest_first]
    assert bars["adj_close"].isna().all()


def test_parse_alone_sorts_one_file(vendor_dir: Path) -> None:
    path = vendor_dir / "IBM.csv"
    got = source(vendor_dir).parse(BarQuery("IBM", "1m", *WIDE), path, path.read_bytes())
    assert got.bars["time"].is_monotonic_increasing
    assert got.bars["time"].iloc[0] == utc("2020-11-23 04:01:00")
    assert got.requests == 1


def test_build_requests_lists_the_symbols_files_by_name(vendor_dir: Path) -> None:
    (vendor_dir / "MSFT.csv").write_text("")
    (vendor_dir / "MSFTX.csv").write_text("")
    (vendor_dir / "MSFT.2019.csv").mkdir()
    paths = source(vendor_dir).build_requests(BarQuery("MSFT", "1d", *WIDE))
    assert [p.name for p in paths] == ["MSFT.csv", "MSFT.dividends.csv"]


def test_date_filter_keeps_whole_days_of_the_window(vendor_dir: Path) -> None:
    on_day = [r for r in rows(AV_EXTENDED) if r["time"].startswith("2020-12-17")]
    assert on_day

    bars = collect(vendor_dir, "IBM", "1m", window=(date(2020, 12, 17), date(2020, 12, 17))).bars

    assert len(bars) == len(on_day)
    assert bars["time"].min() >= utc("2020-12-17")
    assert bars["time"].max() < utc("2020-12-18")
    assert bars["time"].min() == utc(min(r["time"] for r in on_day))


def test_date_filter_on_daily_bars(vendor_dir: Path) -> None:
    bars = collect(vendor_dir, "SPY", window=(date(2020, 8, 24), date(2020, 8, 28))).bars
    expected = [r for r in rows(SPY) if "2020-08-24" <= r["date"] <= "2020-08-28"]
    assert len(expected) == 5
    assert list(bars["time"]) == [utc(r["date"]) for r in expected]
    assert list(bars["close"]) == [float(r["close"]) for r in expected]


def test_intraday_file_read_as_daily_is_refused(vendor_dir: Path) -> None:
    with pytest.raises(PermanentSourceError, match=r"IBM\.csv.*1d bars"):
        collect(vendor_dir, "IBM", "1d")


def test_symbol_and_interval_columns_select_rows(vendor_dir: Path) -> None:
    daily = collect(vendor_dir, "AAPL").bars
    assert list(daily["time"]) == [utc("2024-01-02"), utc("2024-01-03"), utc("2024-01-04")]
    assert list(daily["close"]) == [185.64, 184.25, 181.91]
    assert set(daily["source"]) == {"files"}

    minute = collect(vendor_dir, "AAPL", "1m").bars
    assert list(minute["time"]) == [utc("2024-01-03 14:30")]
    assert np.isnan(minute["adj_close"].iloc[0])

    assert collect(vendor_dir, "AAPL", "5m").bars.empty


def test_offsets_are_honoured(tmp_path: Path) -> None:
    (tmp_path / "7203.T.csv").write_text(
        "time,open,high,low,close,volume\n"
        "2020-01-06T09:00:00+09:00,1,2,0.5,1.5,10\n"  # 00:00 UTC on the 6th
        "2020-01-06T08:59:00+09:00,1,2,0.5,1.4,10\n"  # 23:59 UTC on the 5th
    )
    bars = collect(tmp_path, "7203.T", "1m", window=(date(2020, 1, 6), date(2020, 1, 6))).bars
    assert list(bars["time"]) == [utc("2020-01-06 00:00")]
    assert list(bars["close"]) == [1.5]


def test_daily_bars_take_the_date_as_written(tmp_path: Path) -> None:
    (tmp_path / "7203.T.csv").write_text(
        "date,open,high,low,close,volume\n2020-01-06T00:00:00+09:00,1,2,0.5,1.5,10\n2020-01-07,1,2,0.5,1.6,10\n"
    )
    bars = collect(tmp_path, "7203.T").bars
    assert list(bars["time"]) == [utc("2020-01-06"), utc("2020-01-07")]


@pytest.mark.parametrize(
    ("file_name", "symbol", "expected"),
    [
        ("AAPL.csv", "AAPL", True),
        ("aapl.CSV", "AAPL", True),
        ("AAPL.csv.gz", "AAPL", True),
        ("AAPL.parquet", "aapl", True),
        ("AAPL.2019.csv", "AAPL", True),
        ("AAPL.2019.parquet", "AAPL", True),
        ("MSFT.dividends.csv", "MSFT", True),
        ("0700.HK.csv", "0700.HK", True),
        ("0700.HK.2019.csv.gz", "0700.HK", True),
        ("EURUSD=X.csv", "EURUSD=X", True),
        ("^GSPC.parquet", "^GSPC", True),
        ("BRK-B.csv", "BRK-B", True),
        ("AAPL.csv", "AAP", False),
        ("AAPLX.csv", "AAPL", False),
        ("AAPL.txt", "AAPL", False),
        ("AAPL.csv.bak", "AAPL", False),
        ("AAPL.2019.q1.csv", "AAPL", False),
        ("AAPL..csv", "AAPL", False),
        ("AAPL", "AAPL", False),
        ("0700.HK.csv", "0700.H", False),
        ("GSPC.csv", "^GSPC", False),
        ("EURUSD.csv", "EURUSD=X", False),
    ],
)
def test_file_names_match_symbols(file_name: str, symbol: str, expected: bool) -> None:
    assert holds_symbol(file_name, symbol) is expected


def test_symbols_with_dots_equals_and_carets(tmp_path: Path) -> None:
    body = "Date,Open,High,Low,Close,Adj Close,Volume\n2020-01-02,1,2,0.5,{close},{close},10\n"
    (tmp_path / "0700.HK.csv").write_text(body.format(close=400.2))
    (tmp_path / "0700.HK.2019.csv").write_text(body.replace("2020", "2019").format(close=390.5))
    (tmp_path / "^GSPC.csv.gz").write_bytes(gzip.compress(body.format(close=3257.85).encode()))
    (tmp_path / "EURUSD=X.csv").write_text(body.format(close=1.1217))
    (tmp_path / "EURUSD.csv").write_text(body.format(close=99.0))

    hk = collect(tmp_path, "0700.HK").bars
    assert list(hk["time"]) == [utc("2019-01-02"), utc("2020-01-02")]
    assert list(hk["close"]) == [390.5, 400.2]
    assert list(collect(tmp_path, "^GSPC").bars["close"]) == [3257.85]
    assert list(collect(tmp_path, "EURUSD=X").bars["close"]) == [1.1217]


def test_later_file_by_name_wins_on_a_repeated_bar(tmp_path: Path) -> None:
    header = "date,open,high,low,close,volume\n"
    (tmp_path / "X.2020.csv").write_text(header + "2020-01-02,1,1,1,1.0,1\n2020-01-03,1,1,1,2.0,1\n")
    (tmp_path / "X.csv").write_text(header + "2020-01-03,1,1,1,3.0,1\n")
    assert list(collect(tmp_path, "X").bars["close"]) == [1.0, 3.0]


def test_parquet_round_trip(tmp_path: Path) -> None:
    frame = conform(
        pd.DataFrame(
            {
                "time": pd.to_datetime(["2024-01-03 14:31", "2024-01-03 14:30", "2024-01-03 14:30"], utc=True),
                "symbol": ["AAPL", "AAPL", "MSFT"],
                "interval": "1m",
                "source": "yahoo_finance",
                "open": [184.3, 184.22, 370.0],
                "high": [184.6, 184.5, 371.0],
                "low": [184.2, 184.1, 369.5],
                "close": [184.55, 184.3, 370.5],
                "adj_close": np.nan,
                "volume": [98000.0, 120000.0, 5000.0],
            }
        )
    )
    frame.to_parquet(tmp_path / "AAPL.parquet")

    bars = collect(tmp_path, "AAPL", "1m").bars

    expected = frame.loc[frame["symbol"] == "AAPL"].sort_values("time").reset_index(drop=True)
    expected["source"] = "files"
    pd.testing.assert_frame_equal(bars[list(BAR_COLUMNS)], expected)


def test_parquet_with_naive_times_and_date_column(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "date": pd.to_datetime(["2020-01-02", "2020-01-03"]),
            "open": [1.0, 2.0],
            "high": [1.0, 2.0],
            "low": [1.0, 2.0],
            "close": [1.25, 2.5],
            "volume": [10, 20],
        }
    ).to_parquet(tmp_path / "x.parquet")
    bars = collect(tmp_path, "X").bars
    assert list(bars["time"]) == [utc("2020-01-02"), utc("2020-01-03")]
    assert list(bars["close"]) == [1.25, 2.5]


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    for settings in (VendorFilesSettings(), VendorFilesSettings(path=str(tmp_path / "nope"))):
        with pytest.raises(ConfigError, match=r"data_sources\.files\.path"):
            VendorFiles(settings).collect(BarQuery("AAPL", "1d", *WIDE))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        collect(tmp_path / "file", "AAPL")


def test_missing_file_is_permanent(vendor_dir: Path) -> None:
    with pytest.raises(PermanentSourceError, match=r"no file for TSLA in .*TSLA\.csv or TSLA\.parquet") as info:
        collect(vendor_dir, "TSLA")
    assert info.value.source == "files"
    assert info.value.symbol == "TSLA"


def test_unknown_header_names_file_and_columns(tmp_path: Path) -> None:
    (tmp_path / "X.csv").write_text("when,price\n2020-01-02,1.5\n")
    with pytest.raises(PermanentSourceError, match=r"X\.csv: unrecognised columns \['when', 'price'\]") as info:
        collect(tmp_path, "X")
    assert "Stock Splits" in str(info.value)
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize(("column", "cell"), [("close", "1.2.3"), ("volume", "n/a"), ("open", "NULLX")])
def test_garbage_numbers_are_refused(tmp_path: Path, column: str, cell: str) -> None:
    values = {"open": "1", "high": "2", "low": "0.5", "close": "1.5", "volume": "10", column: cell}
    header = ",".join(values)
    (tmp_path / "X.csv").write_text(f"date,{header}\n2020-01-02," + ",".join(values.values()) + "\n")
    with pytest.raises(PermanentSourceError, match=rf"X\.csv: column '{column}' holds '{cell}'"):
        collect(tmp_path, "X")


def test_garbage_dividend_is_refused(tmp_path: Path) -> None:
    (tmp_path / "X.dividends.csv").write_text("Date,Dividends\n2020-01-02,0.5 USD\n")
    with pytest.raises(PermanentSourceError, match=r"column 'Dividends' holds '0\.5 USD'"):
        collect(tmp_path, "X")


def test_garbage_time_is_refused(tmp_path: Path) -> None:
    (tmp_path / "X.csv").write_text("time,open,high,low,close,volume\nyesterday,1,1,1,1,1\n")
    with pytest.raises(PermanentSourceError, match=r"X\.csv: column 'time' .*not a date or time"):
        collect(tmp_path, "X", "1m")
    with pytest.raises(PermanentSourceError, match=r"X\.csv: column 'time' .*not a date or time"):
        collect(tmp_path, "X", "1d")


@pytest.mark.parametrize(("name", "content"), [("X.csv", b""), ("X.csv.gz", b"not gzip"), ("X.parquet", b"PAR1")])
def test_unreadable_files_are_refused(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PermanentSourceError, match=rf"{name.replace('.', '[.]')}: (the file is empty|cannot read)"):
        collect(tmp_path, "X")
