"""regmirror: a host-local Docker/OCI registry mirror and pull-through cache."""

__version__ = "0.1.0"
