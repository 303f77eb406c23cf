"""Settings declared once: a :class:`Setting` holds a flag's name, type, default, help and choices,
and whether it decides an avatar's frames; command-line flags, config dataclasses, avatar.json and
the server's form fields are derived from lists of them (the lists themselves live with what they
configure, e.g. :mod:`lipsync.render.settings`).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from lipsync.core.errors import Wav2LipError


class SettingError(Wav2LipError, ValueError):
    """Setting values that cannot work together; the message names the flags."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting.

    ``name``: the flag's destination (``--name``) and the config field's name. ``type``: the type of
    the value (of each value with ``nargs``); ``bool`` makes an on/off flag (``store_true``).
    ``parse``: reads the flag's text where ``type`` cannot (e.g. ``auto`` -> 0.0). ``default``: the
    one default (a tuple with ``nargs``; the flag shows it as a list, as argparse gives it).
    ``field``: a field of the config class (False: command line only, or a field the class declares
    itself with another type). ``avatar``: for a setting that decides an avatar's frames, where
    :class:`lipsync.render.avatar_settings.AvatarSettings` keeps it (``"detection.scale"``); avatar.json
    records it under ``name``.
    """

    name: str
    help: str
    default: Any = None
    type: type = str
    parse: Optional[Callable[[str], Any]] = None
    choices: Optional[Tuple] = None
    nargs: Optional[Union[int, str]] = None
    metavar: Optional[Union[str, Tuple[str, ...]]] = None
    required: bool = False
    field: bool = True
    avatar: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag, ``--name``."""
        return "--" + self.name

    @property
    def annotation(self):
        """The config field's type."""
        one = self.type
        if self.nargs is not None:
            return Tuple[(one,) * self.nargs] if isinstance(self.nargs, int) else Tuple[one, ...]
        return Optional[one] if self.default is None else one

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add this setting's flag to ``parser``."""
        kwargs: Dict[str, Any] = {"help": self.help}
        if self.required:
            kwargs["required"] = True
        elif self.type is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["default"] = list(self.default) if self.nargs and self.default is not None else self.default
        if self.type is not bool and (self.parse or self.type is not str):
            kwargs["type"] = self.parse or self.type
        for name in ("choices", "nargs", "metavar"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        parser.add_argument(self.flag, **kwargs)

    def value(self, raw: Any) -> Any:
        """``raw`` (a recorded or typed value: JSON, a form field's parts, a flag) as this setting's
        type; raises TypeError / ValueError when it is not one."""
        if self.nargs is not None:
            if isinstance(raw, (str, bytes)) or (isinstance(self.nargs, int) and len(raw) != self.nargs):
                raise ValueError(f"{self.name} must be {self.nargs} values, got {raw!r}")
            return tuple(self.type(v) for v in raw)
        return self.type(raw)


def by_name(settings: Sequence[Setting]) -> Dict[str, Setting]:
    """``{setting.name: setting}``."""
    return {s.name: s for s in settings}


def add_arguments(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """Add every setting's flag to ``parser``, in order."""
    for s in settings:
        s.add_to(parser)


def settings_dataclass(settings: Sequence[Setting]):
    """Class decorator: the class as a dataclass with, after its own fields, one field per setting
    with ``field`` set (its name, type and default)."""

    def make(cls):
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for s in settings:
            if s.field:
                annotations[s.name] = s.annotation
                setattr(cls, s.name, s.default)
        cls.__annotations__ = annotations
        return dataclasses.dataclass(cls)

    return make
