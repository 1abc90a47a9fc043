"""Credentials in a config: kept out of what is stored or shown (`redact`), handed to Ray workers
apart from the config (`tracking_credentials`, `use_credentials`)."""
from __future__ import annotations

import dataclasses
import os
import re

from splitmatch.config.sections import Config


_SECRET_QUERY_KEYS = ("token", "password", "passwd", "secret", "key", "signature", "credential")


def redact(uri: str | None) -> str | None:
    """`uri` with any user:password@ and secret-looking query values replaced by ***, for
    everything that shows or stores a URI (MLflow servers take credentials from
    MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN instead)."""
    if not uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [any(s in k.lower() for s in _SECRET_QUERY_KEYS) for k, _ in pairs]
    if "@" not in parts.netloc and not any(secret):
        return uri  # untouched (urlunsplit would also rewrite sqlite://// paths)
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if hidden else v) for (k, v), hidden in zip(pairs, secret)],
                      safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# Where MLflow's client takes a tracking server's basic-auth credentials from
# (mlflow.environment_variables); Ray workers get them from `cluster.init_ray`.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def take_credentials(cfg: Config) -> Config:
    """`cfg` with tracking.uri's user:password@ moved out: into MLflow's own environment variables
    of this process (CREDENTIAL_VARIABLES), the URI keeping only where the server is. Nothing made
    from the config (config.yaml, checkpoints, MLflow params, logs, Tune's state, MLflow's own
    "View run at" lines) can then hold them, and the credentials still reach every MLflow call."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    uri = cfg.tracking.uri
    if not uri or "://" not in uri:
        return cfg
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return cfg
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ[CREDENTIAL_VARIABLES[0]] = unquote(user)
    if password:
        os.environ[CREDENTIAL_VARIABLES[1]] = unquote(password)
    clean = urlunsplit(parts._replace(netloc=host))
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=clean))


def tracking_credentials() -> dict[str, str]:
    """This process's MLflow credentials (CREDENTIAL_VARIABLES), for the processes it starts on
    Ray: they travel in memory with the work (Ray Train's loop config, Tune's trial parameters),
    never in a runtime environment, which Ray's agent writes to its log."""
    return {name: os.environ[name] for name in CREDENTIAL_VARIABLES if name in os.environ}


def use_credentials(credentials: dict[str, str] | None) -> None:
    """In a Ray worker: take the credentials `tracking_credentials` gave the driver's work."""
    os.environ.update(credentials or {})


def redact_text(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by *** (`redact`)."""
    return re.sub(r"[a-z][a-z0-9+.-]*://\S+", lambda m: redact(m.group(0)) or "", text)
