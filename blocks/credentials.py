"""Credentials blocks: API keys saved in Prefect, so deployments need no secret in their environment."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class SourceCredentials(Block):
    """An API key for one data source (Alpha Vantage's travels in the query string: it is never logged)."""

    _block_type_name: ClassVar[str] = "marketpipe source credentials"
    _description: ClassVar[str] = "API key of a market-data source, referenced by data_sources.<name>.api_key_block."

    api_key: SecretStr = Field(description="the source's API key")
