# TEMPORARY alias while the restructure lands: mpqc.compiler.qformat is mpqc.core.qformat
import sys as _sys

from mpqc.core import qformat as _m

_sys.modules[__name__] = _m
