"""Benchmarks for the relay (issue 6): `python -m bench --help`. Figures are printed, never asserted."""
