"""Installed as `splitmatch.job_specs`: `splitmatch init` copies these cluster job files out of an
installed splitmatch."""
