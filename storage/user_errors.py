"""The errors whose message already tells a user what to do: the command line prints them as one line, the app
shows them as a message. One list, so both front ends treat the same mistakes alike."""

from __future__ import annotations

from engine.events import TraceFormatError
from engine.models.errors import ModelError
from engine.params import ParamError
from storage.connect import StoreError
from storage.migrations import SchemaTooNewError
from storage.store import RunExists, RunNotFound

USER_ERRORS: tuple[type[BaseException], ...] = (
    ParamError, ModelError, TraceFormatError, RunNotFound, RunExists, SchemaTooNewError, FileExistsError,
    StoreError,
)


def user_message(exc: BaseException) -> str:
    """The one-line message of a user error (a KeyError's str() would wrap it in quotes)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
