"""Prefect tasks: each does one thing over a plain typed core function in ``tlpipe``.

Telemetry of Prefect, MLflow and DVC is switched off before Prefect is imported:
these variables must be set before Prefect reads its settings, so this is the one
deliberate import-time action of the package (``setdefault`` only: a user's own
values win).
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}.items():
    os.environ.setdefault(_key, _value)
