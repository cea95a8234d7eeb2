"""Options as validated dataclasses whose fields make the command line's flags (one pattern for all).

Every options class (each strategy's, the distillation's, the repair's, training's) declares its
fields with ``option(default, help, kind)``. The kind says what a value may be (``KINDS``: a share
in (0, 1], a whole number >= 1, one of some choices, ...), and one table serves both sides:
``check(self)``, called by the class's ``__post_init__``, refuses a bad value from Python in one
sentence naming its flag, and ``add_flags`` gives argparse the same bounds, the help and the
default, so a flag's help never repeats a default by hand. ``given(cls, args)`` reads back the
flags a user gave (the others stay the dataclass's defaults).

    @dataclass(frozen=True)
    class MyOptions:
        keep: float = option(0.5, "share of each channel space kept", "share")
        def __post_init__(self): check(self)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from .errors import CnnmodError


@dataclass(frozen=True)
class Kind:
    """What a value of an option may be: a number within bounds, one of ``choices``, or a switch."""

    what: str  # "a share", "a whole number", ...
    type: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def bounds(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(x for x in (lo, hi) if x)

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int,) if self.type is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return not (too_low or too_high)

    def parse(self, text: str):
        """The argparse type: one line naming the value and the bounds."""
        try:
            value = self.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.what}, found {text!r}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self.what} {self.bounds()}, found {text}".rstrip())
        return value


KINDS = {
    "share": Kind("a share", low=0.0, high=1.0, low_open=True),
    "share0": Kind("a share", low=0.0, high=1.0),
    "count": Kind("a whole number", int, low=1),
    "count0": Kind("a whole number", int, low=0),
    "integer": Kind("a whole number", int),
    "positive": Kind("a number", low=0.0, low_open=True),
    "nonnegative": Kind("a number", low=0.0),
    "points": Kind("a number of points", low=0.0, high=100.0),
    "rate": Kind("a number", low=0.0, high=1.0, low_open=True, high_open=True),
    "fraction": Kind("a number", low=0.0, high=1.0, high_open=True),
}


def option(default, help_text: str | None, kind: str, **more):
    """A field of an options dataclass. ``kind``: a ``KINDS`` name, "choice" (with ``choices=``) or
    "switch" (a flag with no value: True, or ``const``); ``high=`` narrows a number's upper bound;
    ``flag=`` names the flag (default: ``--`` + the class's ``PREFIX`` + the field's name); ``metavar=``
    its value's name; ``shown=False`` leaves the default out of the help (where no flag means "off");
    ``help_text=None``: a Python-only option, with no flag."""
    if kind not in KINDS and kind not in ("choice", "switch"):
        raise ValueError(f"unknown option kind {kind!r}")
    return field(default=default, metadata=dict(help=help_text, kind=kind, **more))


def _kind(f: dataclasses.Field) -> Kind:
    kind = KINDS[f.metadata["kind"]]
    high = f.metadata.get("high")
    return kind if high is None else dataclasses.replace(kind, high=high, high_open=False)


def flag(cls, name: str) -> str:
    """The command-line flag of field ``name`` of options class ``cls``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.metadata.get("flag") or "--" + getattr(cls, "PREFIX", "") + name.replace("_", "-")


def check(options) -> None:
    """Refuse a value its field's kind does not allow, in one sentence naming the flag (None is
    allowed where it is the default: "not given")."""
    for f in dataclasses.fields(options):
        value, kind = getattr(options, f.name), f.metadata.get("kind")
        if kind is None or (value is None and f.default is None):
            continue
        name = flag(type(options), f.name)
        if kind == "switch":
            ok, what = isinstance(value, bool), "true or false"
        elif kind == "choice":
            ok, what = value in f.metadata["choices"], "one of " + ", ".join(map(str, f.metadata["choices"]))
        else:
            number = _kind(f)
            ok, what = number.accepts(value), f"{number.what} {number.bounds()}".rstrip()
        if not ok:
            raise CnnmodError(f"expected {name} to be {what}, found {value!r}.")


def add_flags(parser: argparse.ArgumentParser, cls, *, label: str = "") -> None:
    """One flag per field of ``cls`` that has help; its default (the dataclass's) shown in the help.
    Every flag defaults to None, so that ``given`` tells the flags given from the others."""
    for f in dataclasses.fields(cls):
        md = f.metadata
        if md.get("help") is None:
            continue
        text, dest = label + md["help"], getattr(cls, "PREFIX", "").replace("-", "_") + f.name
        if md["kind"] == "switch":
            parser.add_argument(flag(cls, f.name), dest=dest, action="store_const", const=md.get("const", True),
                                default=None, help=text)
            continue
        if f.default is None or md.get("shown") is False:
            shown = ""
        else:
            shown = f" (default: {f.default:g})" if isinstance(f.default, float) else f" (default: {f.default})"
        parser.add_argument(flag(cls, f.name), dest=dest, type=str if md["kind"] == "choice" else _kind(f).parse,
                            choices=md.get("choices"), default=None, metavar=md.get("metavar"), help=text + shown)


def given(cls, args: argparse.Namespace) -> dict:
    """The fields of ``cls`` whose flags were given on the command line, by field name."""
    prefix = getattr(cls, "PREFIX", "").replace("-", "_")
    found = {f.name: getattr(args, prefix + f.name, None) for f in dataclasses.fields(cls)}
    return {name: value for name, value in found.items() if value is not None}
