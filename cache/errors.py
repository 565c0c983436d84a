"""Errors raised by the cache package."""


class CacheConfigError(ValueError):
    """Impossible cache settings (window < 1, sinks > window, chunk larger than the window...)."""


class CacheStateError(ValueError):
    """A saved cache state does not fit the cache it is restored into, or is unreadable."""


class CacheMemoryError(CacheConfigError, MemoryError):
    """The cache asked for would not fit the memory its device has available (nothing was allocated)."""
