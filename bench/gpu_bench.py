"""Figure 4 (GPU; not run by ``bench.run``): ResNet50 feature throughput on one GPU.

For the lent GPU machines (Python 3.12, JAX with CUDA, PyTorch, no TensorFlow;
Keras travels as a wheel): run ``bash bench/gpu_run.sh`` there (see bench/README.md).
All variants use random weights, pooled final (2048) and mid (512) features,
224 px, one batch size, and read the same N uint8 images:

* ``jax-stream-u8`` (ours, the features stage on GPU): a uint8 ``.npy`` store is
  streamed in batches; each batch goes to the device as uint8 with
  ``jax.device_put`` while the previous one computes (double buffering); cast,
  caffe preprocessing and ResNet50 run in one jitted ``stateless_call`` under
  ``mixed_bfloat16``; features come back to host arrays.
* ``keras-predict-f32``: ``model.predict`` on the images preloaded as one float32
  host array (the course's way), same policy. ``keras-predict-u8``: ``predict``
  of our uint8-input model on the preloaded uint8 array.
* ``torch-eager-bf16`` / ``torch-compile-bf16``: a torchvision-free ResNet50 in
  PyTorch, channels-last, bf16 autocast, fed from the same store through two
  pinned buffers and a copy stream.
* ``*-resident``: compute only, one batch already on the device (upper bounds,
  comparable to ../shared/GUIDE.md section 3).

Warm-up (compilation) is excluded everywhere; each variant's figure is the
median of ``--reps`` timed passes. Prints one line per variant and writes
``$OUT/gpu_bench.json`` (or ``--json``). ``--smoke`` runs the JAX and Keras paths on
CPU with a tiny N (and PyTorch eager when torch is installed) to check the code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

SIZE = 224
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MID_LAYER, FINAL_LAYER = "conv3_block4_out", "conv5_block3_out"


# ---- the uint8 store ----

def write_store(path: Path, count: int, seed: int = 0, block: int = 512) -> Path:
    """Write ``count`` random uint8 images (N, 224, 224, 3) as a ``.npy`` file, block by block."""
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, SIZE, SIZE, 3))
    for start in range(0, count, block):
        stop = min(count, start + block)
        array[start:stop] = rng.integers(0, 256, size=(stop - start, SIZE, SIZE, 3), dtype=np.uint8)
    array.flush()
    del array
    return path


def npy_layout(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of a C-ordered uint8 ``.npy`` file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
        if fortran or dtype != np.uint8:
            raise ValueError(f"{path}: expected a C-ordered uint8 array")
        return shape, handle.tell()


def iter_batches(path: Path, batch: int, out: Callable[[int], np.ndarray] | None = None) -> Iterator[np.ndarray]:
    """Yield consecutive row blocks of a uint8 ``.npy`` with one ``readinto`` each, in order.

    Same reads as ``tlpipe.data.store.iter_npy_batches`` (one batch resident); with
    ``out``, rows are read into the buffer ``out(i)`` returns for batch ``i``
    (e.g. pinned memory) instead of a fresh array.
    """
    shape, offset = npy_layout(path)
    row_bytes = int(np.prod(shape[1:]))
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        for index, start in enumerate(range(0, shape[0], batch)):
            count = min(batch, shape[0] - start)
            buffer = np.empty((count, *shape[1:]), np.uint8) if out is None else out(index)[:count]
            if handle.readinto(memoryview(buffer).cast("B")) != count * row_bytes:
                raise OSError(f"{path}: file ends before row {start + count}")
            yield buffer


# ---- Keras (JAX backend) ----

def build_keras_models():
    """ResNet50 features models sharing one backbone: (uint8 model, float32 model, origin).

    The uint8 model casts inside and wraps the float32 model (preprocessing
    inside, outputs ``{"final": (B, 2048), "mid": (B, 512)}``). Uses tlpipe's
    ``build_extractor`` when tlpipe's imports (pandas, h5py) are available here,
    else an equivalent model with the same preprocessing and taps.
    """
    import keras

    try:
        from tlpipe.features.extraction import build_extractor

        extractor = build_extractor("resnet50", None, SIZE, include_top=False)
        return extractor, next(x for x in extractor.layers if isinstance(x, keras.Model)), "tlpipe"
    except Exception as error:  # noqa: BLE001 - tlpipe's dependencies may be missing on a GPU machine
        print(f"tlpipe extractor unavailable here ({type(error).__name__}: {error}); using the local one",
              flush=True)
    pixels = keras.Input((SIZE, SIZE, 3), dtype="float32", name="pixels")
    x = keras.ops.flip(pixels, axis=-1) - keras.ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype="float32")
    net = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x)
    backbone = keras.Model(pixels, {"final": keras.layers.GlobalAveragePooling2D()(net.get_layer(FINAL_LAYER).output),
                                    "mid": keras.layers.GlobalAveragePooling2D()(net.get_layer(MID_LAYER).output)})
    images = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    outputs = backbone(keras.ops.cast(images, "float32"), training=False)
    extractor = keras.Model(images, {k: keras.ops.cast(v, "float32") for k, v in outputs.items()})
    return extractor, backbone, "local"


_STEPS: dict[int, Callable] = {}


def jax_step(model):
    """A jitted forward of ``model`` with its weights as arguments; returns (step, weights).

    The jitted function is cached per model, so repetitions reuse one compiled
    executable; the weights are read afresh each time (Keras' own ``predict``
    may replace the variables' buffers).
    """
    import jax

    if id(model) not in _STEPS:
        @jax.jit
        def step(trainable, non_trainable, images):
            outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
            return outputs

        _STEPS[id(model)] = step
    weights = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    return _STEPS[id(model)], weights


def jax_stream(model, path: Path, batch: int) -> tuple[float, dict[str, np.ndarray]]:
    """Stream the store through the jitted model, next batch ``device_put`` while one computes."""
    import jax

    step, (trainable, non_trainable) = jax_step(model)
    rows = npy_layout(path)[0][0]
    host = {"final": np.empty((rows, 2048), np.float32), "mid": np.empty((rows, 512), np.float32)}
    warm = jax.device_put(np.zeros((batch, SIZE, SIZE, 3), np.uint8))
    jax.block_until_ready(step(trainable, non_trainable, warm))  # compile, excluded
    start = time.perf_counter()
    batches = iter_batches(path, batch)
    current, row, pending = jax.device_put(next(batches)), 0, None
    while current is not None:
        outputs = step(trainable, non_trainable, current)  # async dispatch
        upcoming = next(batches, None)  # file read overlaps the step in flight
        current = jax.device_put(upcoming) if upcoming is not None else None
        if pending is not None:
            row = _to_host(pending, host, row)  # waits for the previous step only
        pending = outputs
    _to_host(pending, host, row)
    return time.perf_counter() - start, host


def _to_host(outputs: dict, host: dict[str, np.ndarray], row: int) -> int:
    """Copy one batch of device outputs into the host arrays; return the next row."""
    count = 0
    for key, array in host.items():
        values = np.asarray(outputs[key])
        array[row:row + len(values)] = values
        count = len(values)
    return row + count


def jax_resident(model, batch: int, iters: int) -> float:
    """Seconds for ``iters`` jitted steps on one device-resident uint8 batch (compute bound)."""
    import jax

    step, (trainable, non_trainable) = jax_step(model)
    images = jax.device_put(np.random.default_rng(1).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8))
    jax.block_until_ready(step(trainable, non_trainable, images))
    start = time.perf_counter()
    for _ in range(iters):
        outputs = step(trainable, non_trainable, images)
    jax.block_until_ready(outputs)
    return time.perf_counter() - start


def keras_predict(model, images: np.ndarray, batch: int) -> tuple[float, dict[str, np.ndarray]]:
    """``model.predict`` on a preloaded host array (warm-up on one batch excluded)."""
    model.predict(images[:batch], batch_size=batch, verbose=0)
    start = time.perf_counter()
    outputs = model.predict(images, batch_size=batch, verbose=0)
    return time.perf_counter() - start, outputs


# ---- PyTorch ----

def torch_resnet50():
    """A torchvision-free ResNet50 (v1.5: stride on the 3x3) returning pooled (final, mid)."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = (nn.Identity() if stride == 1 and cin == cout else
                          nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    class ResNet50(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            stages, cin = [], 64
            for blocks, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
                layers = []
                for i in range(blocks):
                    layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = width * 4
                stages.append(nn.Sequential(*layers))
            self.stages = nn.ModuleList(stages)
            mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
            self.register_buffer("mean", mean)

        def forward(self, images_nhwc_u8):
            x = images_nhwc_u8.permute(0, 3, 1, 2).float().flip(1) - self.mean  # NCHW view, channels-last strides
            x = self.stem(x.contiguous(memory_format=torch.channels_last))
            x = self.stages[1](self.stages[0](x))
            mid = x.float().mean((2, 3))
            x = self.stages[3](self.stages[2](x))
            return x.float().mean((2, 3)), mid

    return ResNet50()


def torch_model(compile_: bool):
    """The eval-mode model on the best device, channels-last, optionally ``torch.compile``d."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    model = torch_resnet50().to(device).eval().to(memory_format=torch.channels_last)
    return (torch.compile(model) if compile_ else model), device


def torch_stream(model, device: str, path: Path, batch: int) -> tuple[float, dict[str, np.ndarray]]:
    """Stream the store through the model: read into two pinned buffers, copy on a side stream."""
    import torch

    rows = npy_layout(path)[0][0]
    cuda = device == "cuda"
    pinned = [torch.empty((batch, SIZE, SIZE, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    views = [p.numpy() for p in pinned]
    final = torch.empty((rows, 2048), device=device)
    mid = torch.empty((rows, 512), device=device)
    copy_stream = torch.cuda.Stream() if cuda else None
    copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        model(pinned[0][:batch].to(device))  # warm-up / compile, excluded
        model(pinned[0][:batch].to(device))
        _sync(device)
        start, row = time.perf_counter(), 0

        def buffer(i: int) -> np.ndarray:
            if cuda:
                copied[i % 2].synchronize()  # the copy that last read this buffer is done
            return views[i % 2]

        for index, host in enumerate(iter_batches(path, batch, buffer)):
            count, slot = len(host), index % 2
            if cuda:
                with torch.cuda.stream(copy_stream):
                    images = pinned[slot][:count].to(device, non_blocking=True)
                    copied[slot].record(copy_stream)
                torch.cuda.current_stream().wait_stream(copy_stream)
                images.record_stream(torch.cuda.current_stream())
            else:
                images = pinned[slot][:count].clone()
            f, m = model(images)
            final[row:row + count], mid[row:row + count] = f, m
            row += count
        result = {"final": final.cpu().numpy(), "mid": mid.cpu().numpy()}
    return time.perf_counter() - start, result


def torch_resident(model, device: str, batch: int, iters: int) -> float:
    """Seconds for ``iters`` forwards on one device-resident uint8 batch."""
    import torch

    images = torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        model(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- driver ----

def median_run(fn: Callable[[], tuple[float, Any]], reps: int) -> tuple[float, Any]:
    """Run ``fn`` ``reps`` times; return the median seconds and the last result."""
    times, result = [], None
    for _ in range(reps):
        seconds, result = fn()
        times.append(seconds)
    return statistics.median(times), result


def record(results: list[dict], name: str, images: int, seconds: float, **extra: Any) -> None:
    """Add and print one variant's line."""
    entry = {"variant": name, "images": images, "seconds": round(seconds, 4),
             "images_per_s": round(images / seconds, 1), **extra}
    results.append(entry)
    print(f"RESULT {name:<22} {entry['images_per_s']:>10.1f} images/s  ({images} images, {seconds:.3f} s)"
          + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)


def attempt(results: list[dict], name: str, fn: Callable[[], None]) -> None:
    """Run one variant; a failure is recorded and printed, and the others still run."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - report every failure, keep going
        results.append({"variant": name, "error": f"{type(error).__name__}: {error}"})
        print(f"RESULT {name:<22} FAILED {type(error).__name__}: {error}", flush=True)


def environment() -> dict[str, Any]:
    """Versions and devices, for the JSON."""
    import jax
    import keras

    info = {"python": platform.python_version(), "jax": jax.__version__, "keras": keras.__version__,
            "keras_backend": keras.backend.backend(), "jax_devices": [str(d) for d in jax.devices()]}
    try:
        import torch

        info |= {"torch": torch.__version__,
                 "torch_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    except ImportError:
        info["torch"] = None
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every variant and write the JSON; return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12288, help="images in the store")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: N=8, batch 4, 1 rep")
    parser.add_argument("--skip", default="", help="comma-separated variant prefixes to skip")
    parser.add_argument("--workdir", type=Path, default=None, help="where the store is written (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.reps = 8, 4, 1
    if args.n % args.batch:
        parser.error("--n must be a multiple of --batch (one compiled shape)")
    skip = tuple(s for s in args.skip.split(",") if s)
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    results: list[dict] = []
    payload: dict[str, Any] = {"figure": "4 features on GPU: ResNet50, mixed_bfloat16, random weights",
                               "n": args.n, "batch": args.batch, "reps": args.reps, "smoke": args.smoke,
                               "environment": environment(), "results": results}
    print(json.dumps(payload["environment"]), flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    store_path = write_store(workdir / "images.npy", args.n)
    u8_model, f32_model, origin = build_keras_models()
    payload["keras_model"] = origin
    reference: dict[str, np.ndarray] = {}

    def ours() -> None:
        seconds, out = median_run(lambda: jax_stream(u8_model, store_path, args.batch), args.reps)
        reference.update(out)
        record(results, "jax-stream-u8", args.n, seconds)

    def predict_f32() -> None:
        images = np.load(store_path).astype(np.float32)
        seconds, out = median_run(lambda: keras_predict(f32_model, images, args.batch), args.reps)
        record(results, "keras-predict-f32", args.n, seconds, max_abs_diff_vs_ours=max_diff(out, reference))

    def predict_u8() -> None:
        images = np.load(store_path)
        seconds, out = median_run(lambda: keras_predict(u8_model, images, args.batch), args.reps)
        record(results, "keras-predict-u8", args.n, seconds, max_abs_diff_vs_ours=max_diff(out, reference))

    def resident_jax() -> None:
        iters = max(2, args.n // args.batch)
        seconds = statistics.median(jax_resident(u8_model, args.batch, iters) for _ in range(args.reps))
        record(results, "jax-resident", iters * args.batch, seconds)

    variants: list[tuple[str, Callable[[], None]]] = [
        ("jax-stream-u8", ours), ("keras-predict-f32", predict_f32), ("keras-predict-u8", predict_u8),
        ("jax-resident", resident_jax)]
    if _torch_available():
        for compiled in (False, True):
            if compiled and args.smoke:
                continue  # compiling on CPU needs a C++ toolchain and minutes; not a smoke check
            label = "torch-compile-bf16" if compiled else "torch-eager-bf16"
            variants.append((label, lambda c=compiled, name=label: run_torch(results, name, c, store_path, args)))
    else:
        print("torch not installed: PyTorch variants skipped", flush=True)
    for name, fn in variants:
        if skip and name.startswith(skip):
            continue
        attempt(results, name, fn)
    out_path = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out_path}", flush=True)
    store_path.unlink(missing_ok=True)
    return payload


def run_torch(results: list[dict], label: str, compiled: bool, store_path: Path, args: argparse.Namespace) -> None:
    """Time one PyTorch variant, streamed from the store and device-resident."""
    model, device = torch_model(compiled)
    seconds, _ = median_run(lambda: torch_stream(model, device, store_path, args.batch), args.reps)
    record(results, label, args.n, seconds, device=device)
    iters = max(2, args.n // args.batch)
    resident = statistics.median(torch_resident(model, device, args.batch, iters) for _ in range(args.reps))
    record(results, label.replace("-bf16", "-resident"), iters * args.batch, resident, device=device)


def max_diff(outputs: dict, reference: dict[str, np.ndarray]) -> str | None:
    """Largest absolute difference of the final features vs ours, and relative to ours' largest value."""
    if "final" not in reference:
        return None
    diff = float(np.max(np.abs(np.asarray(outputs["final"], np.float32) - reference["final"])))
    return f"{diff:.3g} (rel {diff / (float(np.max(np.abs(reference['final']))) or 1.0):.2g})"


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main(sys.argv[1:])
