"""mpqc: mixed-precision quantization and pruning compiler."""
