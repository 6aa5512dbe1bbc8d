"""Seeded synthetic JPEG sets with natural-looking content, cached under ``bench/out/``.

Each image is a smooth colour field (a few random colours upsampled bicubically),
a handful of shapes, all drawn at quarter size, and texture at three scales
(noise added at quarter, half and full size, larger at coarser scales, so edges
come out soft and the spectrum falls off like a photo's). At q90 a 1600x1200 file
is ~1.5 bits/pixel and decodes ~2x faster in draft mode, close to real photos of
that size (hymenoptera's large JPEGs: 1.9-3.3 bits/pixel, ~2x), saved as a JPEG.
Image ``i`` depends only on ``(seed, i)``, so a set is grown in place: asking for
more files than are cached generates only the missing ones, and a smaller request
(``--quick``) uses the first files of the same set.

Layout: ``<cache>/<name>/c<i % 2>/img_<i:05d>.jpg`` (two classes, so the folder is
a valid ingest source).
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import OUT_DIR
from tlpipe.core.sources import Candidate, SourceListing

VERSION = 2


@dataclass(frozen=True)
class SynthSpec:
    """What a synthetic set looks like."""

    width: int
    height: int
    quality: int = 90
    noise: int = 4
    seed: int = 1234

    @property
    def name(self) -> str:
        """Folder name of the set (changes whenever the content would)."""
        return f"synth_v{VERSION}_{self.width}x{self.height}_q{self.quality}_n{self.noise}_s{self.seed}"


PHOTO = SynthSpec(1600, 1200)
SMALL = SynthSpec(320, 240)


def image_path(root: Path, index: int) -> Path:
    """Path of image ``index`` in a set rooted at ``root``."""
    return root / f"c{index % 2}" / f"img_{index:05d}.jpg"


def render(spec: SynthSpec, index: int) -> Image.Image:
    """Render image ``index`` of ``spec`` (deterministic)."""
    rng = np.random.default_rng([spec.seed, index])
    small_w, small_h = max(8, spec.width // 4), max(8, spec.height // 4)
    field = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    base = Image.fromarray(field, "RGB").resize((small_w, small_h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.integers(0, small_w), rng.integers(0, small_h)
        w, h = rng.integers(small_w // 12, small_w // 3), rng.integers(small_h // 12, small_h // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(int(x), int(y)) for x, y in rng.integers(0, (small_w, small_h), size=(3, 2))], fill=colour)
    image = base
    for scale, amplitude in ((4, 4 * spec.noise), (2, 2 * spec.noise), (1, spec.noise // 2)):
        image = _add_noise(image, rng, amplitude)
        if scale > 1:
            image = image.resize((spec.width * 2 // scale, spec.height * 2 // scale), Image.Resampling.BILINEAR)
    return image


def _add_noise(image: Image.Image, rng: np.random.Generator, amplitude: int) -> Image.Image:
    """Add uniform integer noise in [-amplitude, amplitude] to every channel, clipped."""
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + rng.integers(-amplitude, amplitude + 1, size=pixels.shape, dtype=np.int16)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _write_one(job: tuple[SynthSpec, str, int]) -> None:
    """Worker: render and save one image (atomic rename)."""
    spec, root, index = job
    import io

    from tlpipe.core.files import write_atomic

    buffer = io.BytesIO()
    render(spec, index).save(buffer, "JPEG", quality=spec.quality)
    write_atomic(image_path(Path(root), index), buffer.getvalue())


def ensure_set(spec: SynthSpec, count: int, cache: Path = OUT_DIR / "synth", workers: int = 2) -> list[Path]:
    """Make sure images ``0..count-1`` of ``spec`` exist; return their paths in index order."""
    root = cache / spec.name
    for label in (0, 1):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
    (root / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    paths = [image_path(root, i) for i in range(count)]
    missing = [(spec, str(root), i) for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        print(f"[synth] generating {len(missing)} images of {spec.name} (cached for later runs)", flush=True)
        if workers > 1 and len(missing) > 8:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                pool.map(_write_one, missing, chunksize=8)
        else:
            for job in missing:
                _write_one(job)
    return paths


def listing(paths: list[Path]) -> SourceListing:
    """A class-folder source listing of synthetic files (class = parent folder), sorted by path."""
    root = Path(paths[0]).parent.parent
    candidates = sorted((Candidate(p, p.relative_to(root).as_posix(), p.parent.name) for p in paths),
                        key=lambda c: c.relpath)
    return SourceListing("folder", root, candidates)


if __name__ == "__main__":
    import sys

    for n in map(int, sys.argv[1:] or ["4"]):
        print(len(ensure_set(PHOTO, n)), "photo-sized files ready")
