"""The avatar session agent: server, protocol, scheduling, resilience, metrics, CLI."""

__version__ = "0.1.0"
