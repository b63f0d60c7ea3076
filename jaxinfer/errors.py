"""Exceptions jaxinfer raises for bad input. All are ValueErrors, so generic handlers work."""


class JaxinferError(ValueError):
    """Base class: something the caller gave was wrong; the message says what and what was expected."""


class ConfigError(JaxinferError):
    """A model config.json field is unknown, unsupported, or has an unsupported value."""


class CheckpointError(JaxinferError):
    """A checkpoint is missing tensors, has unexpected tensors, or a tensor has the wrong shape."""


class InvalidRequestError(JaxinferError):
    """A request (prompt or sampling settings) cannot be served as given."""
