"""Benchmarks: printed tables naming the machine, never run as tests."""
