"""Errors the user is meant to read. No third-party imports: methods and nets raise these too."""


class ConfigError(ValueError):
    """A config value that cannot work. Always names the dotted key and, where finite, the allowed values."""

    def __init__(self, key: str, message: str, allowed=None):
        self.key = key
        self.allowed = allowed
        text = f"{key}: {message}"
        if allowed is not None:
            text += f" (allowed: {', '.join(map(str, allowed))})"
        super().__init__(text)


def require(condition: bool, key: str, message: str, allowed=None) -> None:
    """Raise ConfigError(key, ...) unless `condition` holds; keeps validate() methods one line per rule."""
    if not condition:
        raise ConfigError(key, message, allowed)
