"""mpqc runtime: executors over the IR."""
