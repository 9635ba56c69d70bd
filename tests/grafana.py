"""The chart's Grafana dashboard, read as Grafana reads it: its InfluxQL queries with the variables
and macros filled in the way Grafana's InfluxDB data source fills them, run on an InfluxDB 1.x API."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "marketpipe" / "files" / "grafana" / "marketpipe.json"


@dataclass(frozen=True)
class Target:
    panel: str  # the panel's title
    kind: str  # its Grafana panel type
    ref: str  # the target's refId
    query: str  # raw InfluxQL with Grafana's variables and macros


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def targets() -> list[Target]:
    return [Target(p["title"], p["type"], t["refId"], t["query"]) for p in panels() for t in p["targets"]]


def variable_queries() -> dict[str, str]:
    """The query variables' InfluxQL, by variable name."""
    return {v["name"]: v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"}


def interpolate(query: str, variables: dict[str, str], start: datetime, end: datetime, interval: str) -> str:
    """``query`` as Grafana sends it: ``$timeFilter`` as epoch milliseconds, ``$__interval`` and each
    ``$name`` (single-valued, so unescaped) replaced; anything left starting with ``$`` is an error."""
    filled = query.replace("$timeFilter", f"time >= {_ms(start)}ms and time <= {_ms(end)}ms")
    filled = filled.replace("$__interval", interval)
    for name in sorted(variables, key=len, reverse=True):  # $symbol before a shorter name it starts with
        filled = filled.replace(f"${name}", variables[name])
    left = re.findall(r"\$\w+", filled)
    assert not left, f"{left} are not variables of the dashboard: {query}"
    return filled


def influxql(url: str, database: str, query: str) -> list[dict[str, Any]]:
    """The series a query returns (Grafana's request: GET /query with epoch=ms); an error raises."""
    answer = httpx.get(f"{url}/query", params={"db": database, "q": query, "epoch": "ms"}, timeout=30)
    answer.raise_for_status()
    results = answer.json()["results"]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, f"{errors} for {query}"
    return [series for r in results for series in r.get("series", [])]


def _ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)
