"""The teacher service: teachers over the KServe Open Inference Protocol v2 (docs/architecture.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynamic-kd-service")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
