"""User-facing errors: one clear line naming what is wrong and how to fix it."""


class ExplabError(Exception):
    """An error caused by the user's input (config, path, model id, spec).

    The CLI prints ``str(err)`` as a single line and exits non-zero; no traceback.
    Write messages as "<what is wrong>: <how to fix it>".
    """


class ConfigError(ExplabError):
    """A bad config file, field or override."""


class ModelError(ExplabError):
    """An unknown model id, a missing path, or a model of the wrong kind."""
