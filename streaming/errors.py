"""Exceptions raised by sinkstream. Each names the offending field, tensor or input."""


class SinkstreamError(Exception):
    """Base class of every error sinkstream raises on purpose."""


class ConfigError(SinkstreamError, ValueError):
    """A config.json field is missing, unknown, or holds a value the runtime cannot honour."""


class CheckpointError(SinkstreamError, ValueError):
    """A checkpoint's tensors are missing, unexpected, or of the wrong shape; nothing was loaded."""


class TokenizerMissingError(SinkstreamError, RuntimeError):
    """A text call was made on a model loaded without a tokenizer."""


class InvalidInputError(SinkstreamError, ValueError):
    """An argument or request is malformed (bad ids, bad sampling settings, bad messages...)."""


class SessionBusyError(SinkstreamError, RuntimeError):
    """A session was used while another operation on it (an open generate() iterator) is running."""


class PoolFullError(SinkstreamError, RuntimeError):
    """Every slot of a session pool is in use."""
