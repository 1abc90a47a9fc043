"""Installed as `splitmatch.experiments`: these configs ship inside the package, so a config's
name (`splitmatch demo`, `splitmatch config toyworld`) finds it wherever splitmatch is installed."""
