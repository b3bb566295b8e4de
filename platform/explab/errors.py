"""User-facing errors: one clear line naming what is wrong and how to fix it."""

import re


class ExplabError(Exception):
    """An error caused by the user's input (config, path, model id, spec).

    The CLI prints ``str(err)`` as a single line and exits non-zero; no traceback.
    Write messages as "<what is wrong>: <how to fix it>".
    """


class ConfigError(ExplabError):
    """A bad config file, field or override."""


class ModelError(ExplabError):
    """An unknown model id, a missing path, or a model of the wrong kind."""


def user_error(err: BaseException) -> ExplabError | None:
    """The `ExplabError` behind an error raised in a Ray task, actor or Ray Data worker, if any.

    Ray hands an actor's or task's exception back wrapped (``.cause``, ``__cause__``); Ray Data
    hands back a UDF's exception only as text inside its traceback (the object does not cross the
    process boundary), so the last ``explab.errors.<Class>: message`` line is read from there when
    the chain holds none. Returns a fresh error of the same class (one line), or None.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ExplabError) and not type(e).__module__.startswith("ray."):  # not Ray's dual wrapper
            return type(e)(str(e))
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    found = _REMOTE_ERROR.findall(str(err))
    if found:
        kind, message = found[-1]
        return _CLASSES[kind](message.strip())
    return None


_CLASSES: dict[str, type[ExplabError]] = {"ExplabError": ExplabError, "ConfigError": ConfigError,
                                          "ModelError": ModelError}
_REMOTE_ERROR = re.compile(r"\b(ExplabError|ConfigError|ModelError): (.+)$", re.MULTILINE)


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
    ``<Type>: <first line>`` of the innermost error (the traceback belongs in a log file). An explab
    error anywhere behind Ray's wrappers (or in a Ray Data worker's traceback, see `user_error`) wins."""
    cause = user_error(error) or root_cause(error)
    text = str(cause).strip()
    if not isinstance(cause, ExplabError):
        text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0].strip() if lines else type(cause).__name__
