"""Errors the user is meant to read. No third-party imports: methods and nets raise these too."""


class ConfigError(ValueError):
    """A config value that cannot work. Always names the dotted key and, where finite, the allowed values."""

    def __init__(self, key: str, message: str, allowed=None):
        self.key, self.message, self.allowed = key, message, allowed
        text = f"{key}: {message}"
        if allowed is not None:
            text += f" (allowed: {', '.join(map(str, allowed))})"
        super().__init__(text)

    def __reduce__(self):
        # Raised in a Ray worker, the error is pickled to reach the driver: rebuild it from its own fields
        # (the default would call __init__ with the formatted text alone and fail with a TypeError).
        return (type(self), (self.key, self.message, self.allowed))


def require(condition: bool, key: str, message: str, allowed=None) -> None:
    """Raise ConfigError(key, ...) unless `condition` holds; keeps validate() methods one line per rule."""
    if not condition:
        raise ConfigError(key, message, allowed)
