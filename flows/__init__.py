"""Prefect flows, one module per DVC stage (``python -m flows.<stage>``), plus the pipeline flow.

Telemetry of Prefect, MLflow and DVC is switched off before Prefect is imported:
the variables must be set before Prefect reads its settings, so this is the one
deliberate import-time action of the package (``setdefault`` only).
"""

from tlpipe.tracking.connection import quiet_telemetry

quiet_telemetry()
