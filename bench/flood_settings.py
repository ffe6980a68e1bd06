"""Settings of the `runserver` the flood section floods: the benchmark's, serving the notify URL."""

from __future__ import annotations

from .settings import *  # noqa: F403

ROOT_URLCONF = "bench.flood_urls"
ALLOWED_HOSTS = ["127.0.0.1"]
