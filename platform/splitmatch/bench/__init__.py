"""Benchmarks behind `splitmatch bench ...`: scripts that print figures, never timed tests."""
