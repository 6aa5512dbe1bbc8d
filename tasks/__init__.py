"""Prefect tasks: each does one thing over a plain typed core function in ``tlpipe``.

Telemetry is switched off before Prefect is imported (see ``flows/__init__.py``).
"""

from tlpipe.tracking.connection import quiet_telemetry

quiet_telemetry()
