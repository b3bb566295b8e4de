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


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM): a run ends as ``stopped``, as with Ctrl-C."""


def root_cause(error: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of Ray's wrappers (``RayTaskError``,
    ``RayActorError``, ``ActorDiedError``, ...); ``error`` itself when it is not a wrapper.

    ``RayTaskError(X)`` is both a Ray error and an ``X`` whose message embeds the remote traceback:
    this returns the original ``X``, whose message is its own one line."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        if not type(error).__module__.startswith("ray."):
            break
        inner = getattr(error, "cause", None)
        if isinstance(inner, BaseException):
            error = inner
            continue
        if isinstance(error.__cause__, BaseException):
            error = error.__cause__
            continue
        break
    return error


def one_line(error: BaseException) -> str:
    """What to tell the user about ``error``: the explab error's own message, else
    ``<Type>: <first line>`` of the innermost error (the traceback belongs in a log file)."""
    cause = root_cause(error)
    text = str(cause).strip()
    if not isinstance(cause, ExplabError):
        text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0].strip() if lines else type(cause).__name__
