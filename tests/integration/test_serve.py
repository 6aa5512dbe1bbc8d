"""Serve a saved pyfunc image model with ``mlflow models serve`` and query it over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tlpipe.data.images import decode_bytes
from tlpipe.serving.packaging import save_keras_classifier

pytestmark = pytest.mark.slow

SIZE = 32
CLASSES = ["crack", "clean", "dust"]
START_TIMEOUT_S = 90
REQUESTS = 20


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_jpeg(seed: int) -> bytes:
    """A small random JPEG (48 x 40)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def post_json(url: str, payload: dict) -> dict:
    """POST JSON and parse the reply strictly (NaN or Infinity in the reply fail)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read(), parse_constant=lambda name: pytest.fail(f"{name} in JSON reply"))


def wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll ``/ping`` until it answers 200, the server dies, or the timeout passes."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """Terminate the server's process group (it may fork uvicorn workers), then kill if needed."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Path]:
    """A tiny Keras classifier and its pyfunc model folder."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(keras.ops.cast(inputs, "float32"))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(x))
    model = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))
    root = tmp_path_factory.mktemp("serve")
    model.save(root / "frozen.keras")
    save_keras_classifier(root / "model", root / "frozen.keras", CLASSES, SIZE, "stretch")
    return model, root / "model"


@pytest.fixture(scope="module")
def server(network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow models serve`` on the model folder; yields its base URL; always stopped."""
    port = find_free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", str(network[1]), "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(url, process, log)
        yield url
    finally:
        stop_server(process)


def test_served_model_classifies_a_base64_jpeg(network, server: str) -> None:
    model, _ = network
    jpeg = random_jpeg(0)
    expected = np.asarray(model.predict_on_batch(decode_bytes(jpeg, SIZE, "stretch").pixels[None]))[0]
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode("ascii")]]}}
    prediction = post_json(f"{server}/invocations", payload)["predictions"][0]
    assert prediction["class"] == CLASSES[int(expected.argmax())]
    assert prediction["error"] is None
    assert prediction["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert [prediction[f"p_{name}"] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)

    latencies = []
    for _ in range(REQUESTS):
        start = time.perf_counter()
        post_json(f"{server}/invocations", payload)
        latencies.append(time.perf_counter() - start)
    print(f"\nserve latency: median {statistics.median(latencies) * 1000:.1f} ms over {REQUESTS} requests "
          f"(1 image, {SIZE}x{SIZE} model)")


def test_served_model_reports_a_bad_row_as_null_class(server: str) -> None:
    good = base64.b64encode(random_jpeg(1)).decode("ascii")
    payload = {"dataframe_records": [{"image": good}, {"image": base64.b64encode(b"not an image").decode()}]}
    first, second = post_json(f"{server}/invocations", payload)["predictions"]
    assert first["class"] in CLASSES and first["error"] is None
    assert second["class"] is None and second["probability"] is None and "not an image" in second["error"]
