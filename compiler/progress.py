# TEMPORARY alias while the restructure lands: mpqc.compiler.progress is mpqc.core.progress
import sys as _sys

from mpqc.core import progress as _m

_sys.modules[__name__] = _m
