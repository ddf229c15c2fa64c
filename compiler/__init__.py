"""mpqc compiler core."""
