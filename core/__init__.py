"""mpqc's core: the IR, typed errors, fixed-point formats, the target program format and progress bars.

It imports nothing else of mpqc; every other layer builds on it (see tools/check_layers.py)."""
