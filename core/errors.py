"""Typed compiler errors.

Every error a user can cause ends as one of these, with a message that names the
node, tensor or option at fault and says what to do. The CLI prints ``str(err)``
on one line and exits with code 2; it never shows a traceback for them.
"""
from __future__ import annotations


class CompilerError(Exception):
    """Base of every error mpqc reports to a user."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} ({hint})")


class UnsupportedOpError(CompilerError):
    """An operator (or an attribute value of one) that mpqc cannot execute or quantize."""


class VerifyError(CompilerError):
    """The IR breaks one of its invariants (use-def links, topological order, shapes)."""


class PassError(CompilerError):
    """A pass failed; the message names the pass."""


class DataError(CompilerError):
    """A data file or array the user gave is unusable (shape, dtype, NaN, missing split)."""


class ModelError(CompilerError):
    """The model file cannot be read or is not a valid ONNX model."""


class OptionError(CompilerError):
    """A command-line or API option is invalid."""


class TargetError(CompilerError):
    """An accuracy target or budget that cannot be met."""
