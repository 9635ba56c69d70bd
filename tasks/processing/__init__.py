"""The processing steps, one module each, in the order :mod:`tasks.processing.pipeline` runs them:
units and bad ticks (ticks), validation, missing values (missing), adjusted prices and returns
(adjust), indicators; then coverage, which reports what the series lacks. Every step keeps the
contract in :mod:`tasks.processing.step`."""
