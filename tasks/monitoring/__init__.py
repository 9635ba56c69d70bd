"""Watching the pipeline: operation metrics, alerts, freshness SLAs, health and the quality report."""
