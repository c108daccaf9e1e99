#!/usr/bin/env python3
"""Write tests/data/adversarial_mnist.npz: a small committed set of benign and adversarial MNIST inputs.

    .venv/bin/python bench/make_adversarial_testdata.py

For tests that check flag and enforce mode through real gRPC calls. Against version 1 of the
bundled ``mnist_cnn`` (its ONNX weights rebuilt in torch by bench/mnist_torch.py), with the
attacks and parameters of bench/adversarial.py (adversarial-robustness-toolbox):

* 8 FGSM examples (L-infinity, eps 0.3): the first 8 successful ones from test images 0-31;
* 8 PGD examples (L-infinity, eps 0.3, 40 steps of 0.01, random start): the first 8 successful
  ones from test images 32-63;
* 16 benign images: test images 5000-5015, taken as they come (none picked for its score).

Seeds are only test images version 1 classifies correctly, and "successful" means onnxruntime's
class differs from the label, as in the benchmark. Everything stays float32 (an adversarial
perturbation does not survive uint8 quantisation). Reproducible: fixed seeds, a fixed torch
thread count, deterministic torch, and a zip with fixed timestamps, so a rerun with the same
library versions writes the same bytes.

Arrays in the file:
  adversarial [16,1,28,28] float32, adversarial_attack [16] str ("fgsm" / "pgd"),
  adversarial_label, adversarial_prediction (version 1's class for it), adversarial_index (test index),
  adversarial_score (feature-squeezing score, version 1's calibrated squeezers);
  benign [16,1,28,28] float32, benign_label, benign_index, benign_score;
  model_version, model_sha256, attacks (JSON: each attack's parameters), threshold (version 1's
  calibrated threshold when written; flagged means score > threshold).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import adversarial  # noqa: E402
import mnist_torch  # noqa: E402
from train_mnist import save_npz  # noqa: E402

OUT = ROOT / "tests" / "data" / "adversarial_mnist.npz"
VERSION = "1"
PER_ATTACK = 8
POOLS = {"fgsm": range(32), "pgd": range(32, 64)}      # test indices each attack draws from
BENIGN = range(5000, 5016)                            # held-out test images, as in bench/adversarial.py


def successful_examples(name: str, module, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first PER_ATTACK successful examples of ``name`` from its pool: (examples, test indices, predictions)."""
    pool = np.array(POOLS[name])
    correct = mnist_torch.onnx_probabilities(VERSION, x[pool]).argmax(axis=1) == y[pool]
    pool = pool[correct]
    examples = adversarial.run_attack(name, VERSION, module, x[pool], y[pool])
    predictions = mnist_torch.onnx_probabilities(VERSION, examples).argmax(axis=1)
    chosen = np.flatnonzero(adversarial.succeeded(name, predictions, y[pool]))[:PER_ATTACK]
    if len(chosen) < PER_ATTACK:
        raise SystemExit(f"{name}: only {len(chosen)} successful examples in test images {POOLS[name]}")
    return examples[chosen], pool[chosen], predictions[chosen]


def main() -> int:
    import torch

    from agent.detect.calibration.artifact import load_artifact

    torch.set_num_threads(adversarial.THREADS)
    torch.use_deterministic_algorithms(True)
    x, y = mnist_torch.mnist_test()
    module = mnist_torch.load_torch_model(VERSION)

    parts = [successful_examples(name, module, x, y) for name in POOLS]
    adv_x = np.concatenate([p[0] for p in parts]).astype(np.float32)
    adv_index = np.concatenate([p[1] for p in parts]).astype(np.int32)
    adv_prediction = np.concatenate([p[2] for p in parts]).astype(np.uint8)
    adv_attack = np.array([name for name in POOLS for _ in range(PER_ATTACK)])
    benign_index = np.array(BENIGN, dtype=np.int32)
    benign_x = np.ascontiguousarray(x[benign_index], dtype=np.float32)

    model_file = mnist_torch.model_path(VERSION)
    artifact = load_artifact(model_file.with_name("sidewatch-calibration.json"), model_file)
    detector = artifact.make_detector(model_file, device="cpu")
    adv_score, benign_score = detector.score(adv_x).scores, detector.score(benign_x).scores

    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        OUT,
        adversarial=adv_x, adversarial_attack=adv_attack, adversarial_label=y[adv_index].astype(np.uint8),
        adversarial_prediction=adv_prediction, adversarial_index=adv_index,
        adversarial_score=adv_score.astype(np.float32),
        benign=benign_x, benign_label=y[benign_index].astype(np.uint8), benign_index=benign_index,
        benign_score=benign_score.astype(np.float32),
        model_version=np.array(VERSION), model_sha256=np.array(adversarial.sha256_of(model_file)),
        attacks=np.array(json.dumps({name: adversarial.ATTACKS[name] for name in POOLS}, sort_keys=True)),
        threshold=np.float64(artifact.threshold),
    )
    threshold = artifact.threshold
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size:,} bytes): "
          f"{len(adv_x)} adversarial ({', '.join(f'{PER_ATTACK} {n}' for n in POOLS)}), "
          f"{int((adv_score > threshold).sum())} flagged; {len(benign_x)} benign, "
          f"{int((benign_score > threshold).sum())} flagged (threshold {threshold:.6g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
