"""Measurements, each run in a fresh `python -m bench.worker` process and answered as JSON."""
