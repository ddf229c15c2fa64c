# TEMPORARY alias while the restructure lands: mpqc.compiler.errors is mpqc.core.errors
import sys as _sys

from mpqc.core import errors as _m

_sys.modules[__name__] = _m
