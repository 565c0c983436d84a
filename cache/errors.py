"""Errors raised by the cache package."""


class CacheConfigError(ValueError):
    """Impossible cache settings (window < 1, sinks > window, chunk larger than the window...)."""
