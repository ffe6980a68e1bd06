"""Benchmarks for django-wxpay-close: `python -m bench` (see docs/performance.md)."""
