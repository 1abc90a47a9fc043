"""Cluster entry point: `python jobs/entrypoint.py {pseudo|train|tune|eval} CONFIG [options]`.

The same command line as `splitmatch ...`, for Ray Jobs, the cluster launcher and KubeRay. The
`splitmatch` package comes with the job's runtime environment (`splitmatch submit` ships it);
from a plain checkout it is found in ../platform.
"""
import sys
from pathlib import Path

try:
    import splitmatch  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from splitmatch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
