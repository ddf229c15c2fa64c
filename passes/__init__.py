"""mpqc passes: one pass per module, each a thin wrapper over compiler functions.

The built-in passes are listed explicitly in ``passes/registry.py`` (``get_all_passes()``);
importing this package imports none of them."""
