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
        if isinstance(e, ExplabError):
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
