"""The settings model: one pydantic-settings class reads the YAML file and the environment.

Precedence, highest first: ``MARKETPIPE__SECTION__KEY`` variables, the seed's plain variables
(``ALPHA_VANTAGE_API_KEY``, ``INFLUXDB_URL`` ...), then the YAML file chosen by ``--config`` or by
``MARKETPIPE_ENV`` (``configs/<env>.yaml``, default ``development``).
"""

from __future__ import annotations

import os
import re
import tempfile
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import exchange_calendars as xc
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from configs.indicators import KINDS, UNKNOWN_KIND, IndicatorSpec, default_indicators, nearest

CONFIG_DIR = Path(__file__).resolve().parent
ENV_PREFIX = "MARKETPIPE__"
ENV_SELECTOR = "MARKETPIPE_ENV"

# The seed's variable names, kept working for existing deployments.
LEGACY_ENV_KEYS: dict[str, tuple[str, ...]] = {
    "ALPHA_VANTAGE_API_KEY": ("data_sources", "alpha_vantage", "api_key"),
    "INFLUXDB_URL": ("storage", "influxdb", "url"),
    "INFLUXDB_TOKEN": ("storage", "influxdb", "token"),
    "INFLUXDB_ORG": ("storage", "influxdb", "org"),
    "INFLUXDB_BUCKET": ("storage", "influxdb", "bucket"),
}


class ConfigError(Exception):
    """The configuration can't be read or is invalid. The message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySettings(_Section):
    """Transient errors are retried with exponential backoff and full jitter, within a time budget."""

    max_attempts: int = Field(5, ge=1, description="attempts per request, the first included")
    initial_wait: float = Field(1.0, gt=0, description="seconds; the backoff cap doubles from here")
    max_wait: float = Field(60.0, gt=0, description="seconds; cap for one wait, Retry-After included")
    max_total: float = Field(300.0, gt=0, description="seconds; give up once retrying has taken this long")


class SourceSettings(_Section):
    """The keys every source reads. A source with keys of its own declares them beside it, in a
    subclass in ``tasks/sources/<name>.py`` (its ``settings_model``), which checks them."""

    base_url: str = ""
    rate_limit: int = Field(3600, gt=0, description="requests per hour, paced smoothly")
    requests_per_minute: int | None = Field(None, gt=0)
    requests_per_day: int | None = Field(None, gt=0, description="a quota: symbols past it are deferred")
    burst: int = Field(1, ge=1, description="requests allowed back to back above the smooth pace")
    headroom: float = Field(
        0.07, ge=0, lt=0.5, description="pace this fraction below the limit: network and scheduling jitter"
    )
    concurrency: int = Field(4, ge=1, description="collect tasks of this source running at once, across workers")
    timeout: float = Field(30, gt=0, description="seconds per request")
    retry: RetrySettings = RetrySettings()
    api_key: SecretStr | None = None
    api_key_block: str | None = Field(None, description="name of a saved SourceCredentials block holding the API key")


class SourceEntry(SourceSettings):
    """A ``data_sources`` entry as configured: the common keys are checked on load, and the source's
    own keys are kept for its settings model, which checks them when the source is loaded."""

    model_config = ConfigDict(extra="allow")


class CollectionSettings(_Section):
    overlap_days: float = Field(5, ge=0, description="re-collect this far before the last stored bar")
    default_history_days: int = Field(730, gt=0, description="history collected for a symbol seen first")
    rate_limit_dir: str = Field(
        default_factory=lambda: str(Path(tempfile.gettempdir()) / "marketpipe-rate-limits"),
        description="pace and daily-quota state, shared by every process that sees the directory: on "
        "Kubernetes a path on a persistent volume (the chart points it at the spool's claim), or each pod "
        "starts the day's count at 0",
    )
    task_retries: int = Field(
        0, ge=0, description="collect-task retries once its requests' own retries are spent; transient errors only"
    )
    task_retry_delay: float = Field(60, ge=0, description="seconds before a collect task is retried")
    workers: int = Field(
        8, ge=1, le=64, description="symbols in flight at once: each goes collect -> process -> store in its own thread"
    )
    batch_size: int = Field(
        1,
        ge=1,
        le=500,
        description="symbols per collect, process and store task: 1 gives each symbol its own tasks in the "
        "Prefect UI; more (say 50) cuts the task runs of a large backfill, and a symbol's failure still "
        "fails only that symbol",
    )
    processes: int = Field(
        0,
        ge=0,
        le=64,
        description="worker processes for the processing step, which holds the GIL: 0 processes in the run's "
        "own threads; on a machine with more cores than the run keeps busy, one per spare core",
    )
    symbols_per_flow_run: int = Field(
        300,
        ge=1,
        le=330,
        description="a run over more symbols runs them in child flow runs of this many, three task runs each, so "
        "no flow run holds more than about 1,000 task runs (Prefect servers slow down past a few thousand)",
    )


def trading_calendar_name(name: str) -> str:
    """A calendar name exchange_calendars knows, resolved from an alias (NYSE) to its canonical name (XNYS)."""
    names = set(xc.get_calendar_names(include_aliases=True))
    for candidate in (name.strip(), name.strip().upper()):
        if candidate in names:
            return str(xc.resolve_alias(candidate))
    raise ValueError(
        f"unknown trading calendar {name!r}: use an exchange_calendars name such as XNYS, XLON, XETR, "
        "XTKS, 24/7 (crypto) or 24/5 (FX); exchange_calendars.get_calendar_names() lists them all"
    )


class QualitySettings(_Section):
    """How bars are checked and repaired before they are stored (see the README's "Data quality")."""

    missing: Literal["drop", "ffill", "keep"] = Field(
        "drop", description="bars missing a price: drop them, carry the last close (flagged) or keep NaN"
    )
    spike_threshold: float = Field(
        0.25, gt=0, description="relative move from both neighbours that flags a single-bar spike"
    )
    ohlc_tolerance: float = Field(
        0.002,
        ge=0,
        lt=0.05,
        description="open/close this far (relative) outside low..high are taken in by widening high/low, "
        "flagged flag_ohlc_repaired; beyond it the bar is quarantined. 0 repairs nothing",
    )
    calendars: dict[str, str] = Field(
        default_factory=dict,
        description="symbol -> exchange_calendars name (XNYS, XLON, 24/7 ...), overriding the exchange in the data",
    )

    @field_validator("calendars")
    @classmethod
    def _known_calendars(cls, calendars: dict[str, str]) -> dict[str, str]:
        return {symbol.strip().upper(): trading_calendar_name(name) for symbol, name in calendars.items()}


Level = Literal["info", "warning", "error", "critical"]
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _short_duration(value: Any) -> Any:
    """``90m``, ``2h``, ``1d`` as a timedelta; ISO 8601 (``PT2H``) and seconds still work."""
    if isinstance(value, str) and (found := _DURATION.match(value)):
        return timedelta(seconds=float(found[1]) * _UNIT_SECONDS[found[2]])
    return value


Duration = Annotated[timedelta, BeforeValidator(_short_duration)]


class AlertChannel(_Section):
    """Where alerts go: a Prefect notification block `marketpipe setup` saves from this entry."""

    kind: Literal["slack", "webhook"] = Field(
        description="slack: an incoming-webhook URL; webhook: JSON {title, text, source} POSTed to the URL"
    )
    url: SecretStr = Field(description="the webhook URL; it often holds a token, so set it from the environment")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers (webhook only)")


class AlertRule(_Section):
    enabled: bool = True
    level: Level = "error"
    channels: list[str] = Field(default_factory=list, description="channel names; empty: every channel")


class SpoolRule(AlertRule):
    level: Level = "warning"
    older_than: Duration = Field(timedelta(hours=6), description="alert once the oldest spooled batch is older")


class FreshnessRule(AlertRule):
    level: Level = "warning"
    deadline: Duration = Field(
        timedelta(hours=2), description="a session's bar is due this long after its exchange's close"
    )


class AlertRules(_Section):
    run_failed: AlertRule = AlertRule()  # a flow run failed or crashed (not for its symbols: those say so)
    symbol_failed: AlertRule = AlertRule()  # a symbol failed or was spooled
    spool_stale: SpoolRule = SpoolRule()
    freshness: FreshnessRule = FreshnessRule()


class AlertSettings(_Section):
    """Alert channels and rules; `marketpipe setup` makes them notification blocks and Prefect automations."""

    channels: dict[str, AlertChannel] = Field(default_factory=dict)
    rules: AlertRules = AlertRules()
    flows: list[str] = Field(
        default_factory=lambda: ["market-data", "market-data-sharded", "maintenance", "monitor"],
        description="the flows whose failed or crashed runs the run_failed rule reports",
    )

    @model_validator(mode="after")
    def _known_channels(self) -> AlertSettings:
        for name in type(self.rules).model_fields:
            unknown = [c for c in getattr(self.rules, name).channels if c not in self.channels]
            if unknown:
                known = ", ".join(sorted(self.channels)) or "none configured"
                raise ValueError(
                    f"alerts.rules.{name}.channels names {', '.join(unknown)}, not a channel of alerts.channels "
                    f"({known}): add it there or fix the name"
                )
        return self


class RetentionSettings(_Section):
    """How long bars are kept; `marketpipe setup` applies it to the configured store, idempotently."""

    duration: str | None = Field(
        None, pattern=r"^[1-9][0-9]*[hdw]$", description="e.g. 365d, 52w or 720h; unset keeps everything"
    )


class DuckDBSettings(_Section):
    path: str = "data/marketpipe.duckdb"


class InfluxDBSettings(_Section):
    url: str = "http://localhost:8086"
    org: str = "marketpipe"
    bucket: str = "market_data"
    token: SecretStr | None = None


class InfluxDBV1Settings(_Section):
    url: str = "http://localhost:8086"
    database: str = "market_data"
    retention_policy: str = "autogen"
    username: str | None = None
    password: SecretStr | None = None


class StorageSettings(_Section):
    backend: Literal["duckdb", "influxdb", "influxdb_v1"] = "duckdb"
    spool_dir: str = Field(
        "data/spool", description="writes the store could not take wait here for `marketpipe replay` or the next run"
    )
    block: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="a saved store block of the backend's type to use; `marketpipe setup` saves it from this section",
    )
    duckdb: DuckDBSettings = DuckDBSettings()
    influxdb: InfluxDBSettings = InfluxDBSettings()
    influxdb_v1: InfluxDBV1Settings = InfluxDBV1Settings()


class RealtimeSettings(_Section):
    """`marketpipe realtime`: how it polls and where the streamer is (the CLI's options win)."""

    stream_url: str = Field(
        "wss://streamer.finance.yahoo.com/?version=2", description="Yahoo's price streamer, for --mode stream"
    )
    poll_seconds: float = Field(5.0, gt=0, description="a bar not served yet is asked for again this often")
    poll_delay: float = Field(1.0, ge=0, description="seconds after a bar's close before its first poll")
    stall_seconds: float = Field(120.0, gt=0, description="/healthz answers 503 once the loop was quiet this long")
    resubscribe_seconds: float = Field(15.0, gt=0, description="the streamer's subscription is sent again this often")
    silence_seconds: float = Field(
        30.0, gt=0, description="a streamer quiet this long in a session is connected to again"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
    )

    environment: str = "development"
    debug: bool = False
    data_sources: dict[str, SourceEntry]
    storage: StorageSettings = StorageSettings()
    collection: CollectionSettings = CollectionSettings()
    quality: QualitySettings = QualitySettings()
    retention: RetentionSettings = RetentionSettings()
    alerts: AlertSettings = AlertSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    symbols: list[str] = Field(default_factory=list)
    indicators: list[IndicatorSpec] = Field(default_factory=default_indicators)
    _file: Path | None = PrivateAttr(None)

    @field_validator("indicators")
    @classmethod
    def _one_indicator_per_column(cls, indicators: list[IndicatorSpec]) -> list[IndicatorSpec]:
        writers: dict[str, int] = {}
        for position, spec in enumerate(indicators):
            for column in spec.columns:
                if column in writers:
                    raise ValueError(
                        f"indicators[{writers[column]}] and indicators[{position}] both write column {column!r}: "
                        "remove one or change its parameters"
                    )
                writers[column] = position
        return indicators

    @property
    def config_file(self) -> Path | None:
        """The file these settings were read from, for error messages."""
        return self._file

    def source(self, name: str) -> SourceSettings:
        try:
            return self.data_sources[name]
        except KeyError:
            known = ", ".join(sorted(self.data_sources)) or "none"
            raise ConfigError(
                f"unknown source {name!r}: add a `data_sources.{name}` section to the config "
                f"(configured sources: {known})"
            ) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _LegacyEnvSource(settings_cls),
            _YamlFileSource(settings_cls, _config_file.get()),
        )


_config_file: ContextVar[Path | None] = ContextVar("marketpipe_config_file", default=None)


class _YamlFileSource(PydanticBaseSettingsSource):
    """The YAML file, read once; a missing or malformed file is a ConfigError."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.data: dict[str, Any] = _read_yaml(path) if path is not None else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


class _LegacyEnvSource(PydanticBaseSettingsSource):
    """Maps the seed's flat variable names onto their nested keys."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for variable, path in LEGACY_ENV_KEYS.items():
            value = os.environ.get(variable)
            if not value:
                continue
            node = nested
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        return nested


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at the top level")
    return data


def resolve_config_file(config_file: str | Path | None = None) -> Path:
    """``--config`` wins; otherwise ``MARKETPIPE_ENV`` picks ``configs/<env>.yaml``."""
    if config_file:
        return Path(config_file)
    environment = os.environ.get(ENV_SELECTOR, "development").strip() or "development"
    path = CONFIG_DIR / f"{environment}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(
            f"{ENV_SELECTOR}={environment!r} has no config file {path}: use one of {known} or pass --config FILE"
        )
    return path


def load_settings(config_file: str | Path | None = None) -> Settings:
    """Read and validate the settings, turning every problem into one readable ConfigError."""
    path = resolve_config_file(config_file)
    token = _config_file.set(path)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(describe(exc, path)) from None
    finally:
        _config_file.reset(token)
    settings._file = path
    return settings


def describe(error: ValidationError, path: Path | None, within: tuple[str, ...] = ()) -> str:
    """The problems of ``error`` as one message naming each key, its variable and the fix; ``within``
    is the section the validated model sits in (``("data_sources", "files")``)."""
    problems = []
    where = f"file {path}" if path is not None else "the config file"
    for item in error.errors(include_url=False):
        loc = (*within, *item["loc"])
        if loc[:1] == ("indicators",) and len(loc) > 2 and loc[2] in KINDS:
            loc = loc[:2] + loc[3:]  # the kind's tag pydantic puts in: the entry's key is enough
        listed = next((i for i, part in enumerate(loc) if isinstance(part, int)), len(loc))
        location = [str(part) for part in loc[:listed]]  # a list is set whole, by one variable
        key = ""
        for part in loc:
            key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
        key = key or "(top level)"
        env_name = ENV_PREFIX + "__".join(p.upper() for p in location)
        if item["type"] == "extra_forbidden":
            hint = "unknown key: remove it or fix its spelling"
        elif item["type"] == UNKNOWN_KIND:
            given = item["input"].get("kind") if isinstance(item["input"], dict) else None
            key += ".kind"
            hint = f"unknown kind {given!r}: {nearest(str(given), KINDS)}" if given else "`kind` is missing: add it"
        elif item["type"] == "missing":
            hint = "required key is missing: add it"
        else:
            hint = item["msg"].removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], list) and not _looks_secret(location):
                hint += f" (got {item['input']!r})"
        problems.append(f"  {key}: {hint} [{where} or env {env_name}]")
    return "invalid configuration:\n" + "\n".join(problems)


def _looks_secret(location: list[str]) -> bool:
    # Alert channels' URLs hold tokens, and a rule's error is told on the whole section.
    return any(part in {"api_key", "token", "password", "alerts"} for part in location)
