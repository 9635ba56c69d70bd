"""Line protocol for both InfluxDB backends: one vectorized serializer, exact and injection-proof.

Every numeric column becomes a float field, written in the shortest text that reads back as the
same float64 (Arrow's cast does this in C, which is what makes it fast). NaN fields are omitted,
never written as 0, and a row whose fields are all NaN is not written at all. Text fields (only
quarantine's ``reason``) are quoted. Measurement, tag and field names and tag values are escaped
per the line-protocol rules; a line break can't be escaped there, so it is refused instead: no
value can start a new line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

LINES_PER_BATCH = 5000
_AMBIGUOUS_BACKSLASH = re.compile(r"\\(?=[,= ]|$)")


class LineProtocolError(ValueError):
    """A frame that can't be written as line protocol; the message names the column and value."""


def escape_measurement(name: str) -> str:
    return _plain_backslashes(name).replace(",", "\\,").replace(" ", "\\ ")


def escape_key(text: str) -> str:
    """Tag keys, tag values and field keys escape commas, equals signs and spaces."""
    return _plain_backslashes(text).replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def _plain_backslashes(text: str) -> str:
    """Names and tag values keep a backslash literally, unless it would escape what follows."""
    if _AMBIGUOUS_BACKSLASH.search(text):
        raise LineProtocolError(f"{text!r} has a backslash before a comma, space, '=' or its end: it can't round-trip")
    return _refuse_newlines(text)


def escape_string_field(text: str) -> str:
    return '"' + _refuse_newlines(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _refuse_newlines(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise LineProtocolError(f"{text!r} contains a line break, which line protocol cannot carry")
    return text


def serialize(
    frame: pd.DataFrame,
    measurement: str,
    tags: Sequence[str],
    text_fields: Sequence[str] = (),
) -> pa.StringArray:
    """One line per row that has a field, each ending in a newline; timestamps in whole seconds.

    ``frame`` has a tz-aware ``time`` column, the ``tags`` columns and field columns; every other
    column is a field (float, or quoted text for ``text_fields``).
    """
    fields = [c for c in frame.columns if c != "time" and c not in tags]
    if frame.empty or not fields:
        return pa.array([], type=pa.string())
    if frame["time"].isna().any():
        raise LineProtocolError("a row has no time: line protocol needs one on every point")
    prefix = _series_prefix(frame, escape_measurement(measurement), tags)
    values = [_values(frame[c], c, c in text_fields) for c in fields]
    keys = [escape_key(c) + "=" for c in fields]
    seconds = pd.DatetimeIndex(frame["time"]).tz_convert(None).as_unit("s").to_numpy().view(np.int64)
    stamps = pc.cast(pa.array(seconds), pa.string())
    complete = np.logical_and.reduce([v.is_valid().to_numpy(zero_copy_only=False) for v in values])
    if complete.all():  # the common case: one join builds every line
        return _join_complete(prefix, keys, values, stamps)
    # Rows with a NaN field: omit those fields, and the row when none is left. Line order is free.
    full = pa.array(complete)
    partial = pc.invert(full)
    # "key=value," per present field (null when missing), concatenated with nulls as "", the last
    # comma trimmed. (Arrow's null_handling="skip" drops rows whose inputs are all null.)
    pieces = [pc.binary_join_element_wise(k, pc.filter(v, partial), ",", "") for k, v in zip(keys, values, strict=True)]
    joined = pc.utf8_rtrim(
        pc.binary_join_element_wise(*pieces, "", null_handling="replace", null_replacement=""), characters=","
    )
    lines = pc.binary_join_element_wise(pc.filter(prefix, partial), joined, pc.filter(stamps, partial), " ")
    lines = pc.binary_join_element_wise(pc.filter(lines, pc.not_equal(joined, "")), "\n", "")
    head = _join_complete(pc.filter(prefix, full), keys, [pc.filter(v, full) for v in values], pc.filter(stamps, full))
    return pa.concat_arrays([head, lines]) if len(head) else lines


def _join_complete(prefix: pa.Array, keys: list[str], values: list[pa.Array], stamps: pa.Array) -> pa.Array:
    """``prefix key=value,key=value stamp\n`` for rows with every field present, in one pass."""
    parts: list[pa.Array | str] = [prefix]
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        parts += [(" " if i == 0 else ",") + key, value]
    parts += [" ", stamps, "\n"]
    return pc.binary_join_element_wise(*parts, "")


def _series_prefix(frame: pd.DataFrame, measurement: str, tags: Sequence[str]) -> pa.Array:
    """``measurement,tag=value,...`` per row, escaping each distinct value once."""
    prefix = pa.array(np.full(len(frame), measurement, dtype=object), type=pa.string())
    for tag in sorted(tags):  # InfluxDB prefers tags sorted by key
        values = pd.Categorical(frame[tag].astype(str))
        escaped = np.asarray([f"{escape_key(tag)}={escape_key(v)}" for v in values.categories], dtype=object)
        if any(v == "" for v in values.categories):
            raise LineProtocolError(f"tag {tag!r} is empty on some rows: every point needs a value for it")
        per_row = pa.DictionaryArray.from_arrays(pa.array(values.codes), pa.array(escaped, type=pa.string()))
        prefix = pc.binary_join_element_wise(prefix, per_row.cast(pa.string()), ",")
    return prefix


def _values(values: pd.Series, name: str, text: bool) -> pa.Array:
    """Field values as line-protocol text, null where the value is missing."""
    if text:
        quoted = [None if pd.isna(v) else escape_string_field(str(v)) for v in values]
        return pa.array(quoted, type=pa.string())
    numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(numbers).any():
        raise LineProtocolError(f"field {name!r} holds an infinite value, which InfluxDB cannot store")
    return pc.cast(pa.array(numbers, from_pandas=True), pa.string())


def batches(lines: pa.StringArray, size: int = LINES_PER_BATCH) -> Iterator[bytes]:
    """The lines as request bodies of ``size`` lines, straight from Arrow's buffer."""
    for start in range(0, len(lines), size):
        chunk = lines.slice(start, size)
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        yield data.slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_pybytes() if data is not None else b""
