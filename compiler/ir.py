# TEMPORARY alias while the restructure lands: mpqc.compiler.ir is mpqc.core.ir
import sys as _sys

from mpqc.core import ir as _m

_sys.modules[__name__] = _m
