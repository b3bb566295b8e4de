"""Personalization methods: each a class with ``fit(view)`` on a user's history and ``respond(prompt)``."""

from jobs.apm.methods.base import Method, MethodContext, Turn, UserView

__all__ = ["Method", "MethodContext", "Turn", "UserView"]
