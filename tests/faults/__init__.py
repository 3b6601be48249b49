"""Fault tests: crashes, torn and corrupt files, disk full, stalls, overload, fuzzing."""
