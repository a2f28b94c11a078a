"""The error for data a user supplied that cannot be used: `sims` reports it in one line, without a traceback."""


class DataError(ValueError):
    """Input data (a data source, a shard set) that is missing, malformed or inconsistent with the config; the
    message names the file or config field and what was expected."""
