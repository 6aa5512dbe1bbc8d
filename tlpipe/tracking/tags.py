"""The tags and variables tlpipe's MLflow runs are found by."""

from __future__ import annotations

PARENT_ENV = "TLPIPE_PARENT_RUN_ID"
TASK_TAG = "tlpipe.task"
SESSION_TAG = "tlpipe.session"
STAGE_TAG = "tlpipe.stage"
KIND_TAG = "tlpipe.kind"
MODEL_TAG = "tlpipe.model"
MODEL_SHA_TAG = "tlpipe.model_sha"
MODEL_ID_TAG = "tlpipe.model_id"
PYFUNC_URI_TAG = "tlpipe.pyfunc_uri"
PID_TAG = "tlpipe.pid"
HOST_TAG = "tlpipe.host"
PROCESS_START_TAG = "tlpipe.process_start"
REAPED_TAG = "tlpipe.reaped"
