#!/usr/bin/env python3
"""Which second detector beside feature squeezing? The candidates measured in-process, before building one.

    .venv/bin/python bench/adversarial_candidates.py --out bench-results/adversarial_candidates.json

Candidates, each fitted on benign data only (the bundled reference, ``agent/demo/data/mnist_reference.npz``,
5,000 validation images: the first 3,000 to train or fit, the last 2,000 to calibrate on):

* ``ae_*``: a MagNet-style autoencoder (agent/detect/calibration/autoencoder_training.py) trained on
  the 3,000 (MagNet's recipe with 3 and 16 filters; ``ae_magnet_i_12``, the recipe sidewatch ships);
  scores: the reconstruction error per input, mean |x - AE(x)| (``l1``) or mean (x - AE(x))^2
  (``l2``), and the Jensen-Shannon divergence between the model's softmax on x and on AE(x) at
  temperature T (``jsd_T``, MagNet's probability-divergence detector).
* ``mahalanobis``: the model's penultimate features (the 128 ReLU outputs before the last Gemm),
  class-conditional Gaussians with one shared covariance (Lee et al., NeurIPS 2018) fitted on the
  3,000 by predicted class; score: the smallest Mahalanobis distance to a class mean.

Each combination with squeezing is calibrated JOINTLY on the 2,000 (agent.detect.calibration.threshold.
joint_thresholds: every score goes to its benign level, the combined statistic is the largest level,
and its threshold is set at the 5% target), then measured on the held-out benign test images
5,000-9,999 (FPR) and on the successful examples of every attack in bench/adversarial.py's cache
(generated there if missing). Reported per candidate: ROC-AUC per attack, and per combination the
detection rate per attack and the held-out FPR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import adversarial  # noqa: E402  (bench/adversarial.py: the attacks, their cache, roc_auc)
import mnist_torch  # noqa: E402

from agent.demo.data import REFERENCE  # noqa: E402

VERSION = "1"
FIT, CALIBRATION = slice(0, 3000), slice(3000, 5000)
TARGET_FPR = 0.05
PENULTIMATE = "/0/0.8/Relu_output_0"   # the ReLU before mnist_cnn's last Gemm
# MagNet's MNIST autoencoders as published (3 filters, no photometric augmentation), a wider one, and the
# recipe sidewatch ships (agent.detect.calibration.autoencoder_training.TrainingRecipe's defaults).
MAGNET_SCHEDULE = {"epochs": 100, "batch_size": 256, "learning_rate": 1e-3, "brightness": 0.0}
AUTOENCODERS = {
    "ae_magnet_i_3": {"architecture": "magnet_i", "filters": 3, **MAGNET_SCHEDULE},
    "ae_magnet_ii_3": {"architecture": "magnet_ii", "filters": 3, **MAGNET_SCHEDULE},
    "ae_magnet_i_16": {"architecture": "magnet_i", "filters": 16, **MAGNET_SCHEDULE},
    "ae_magnet_i_12": {"architecture": "magnet_i", "filters": 12, "epochs": 120, "batch_size": 64,
                       "learning_rate": 3e-3, "brightness": 0.3},
}
TEMPERATURES = (1.0, 10.0, 40.0)


def log(message: str) -> None:
    print(f"[candidates] {message}", file=sys.stderr, flush=True)


def session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def with_penultimate_output(model_path: Path) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    model.graph.output.append(helper.make_tensor_value_info(PENULTIMATE, TensorProto.FLOAT, None))
    return model.SerializeToString()


def run_batches(sess, x: np.ndarray, outputs: list[str], batch: int = 500) -> list[np.ndarray]:
    parts = [sess.run(outputs, {"input": x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


def jsd(p: np.ndarray, q: np.ndarray, temperature: float) -> np.ndarray:
    """Jensen-Shannon divergence of softmax(log p / T) and softmax(log q / T), per row (nats)."""
    def soften(probabilities):
        logits = np.log(np.clip(probabilities.astype(np.float64), 1e-30, None)) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    p, q = soften(p), soften(q)
    m = (p + q) / 2

    def kl(a, b):
        return np.sum(a * (np.log(np.clip(a, 1e-300, None)) - np.log(np.clip(b, 1e-300, None))), axis=1)

    return (kl(p, m) + kl(q, m)) / 2


class Mahalanobis:
    """Class-conditional Gaussians with a shared covariance on the penultimate features (Lee et al. 2018)."""

    def fit(self, features: np.ndarray, classes: np.ndarray, n_classes: int, ridge: float = 1e-3):
        features = features.astype(np.float64)
        self.means = np.stack([features[classes == c].mean(axis=0) if np.any(classes == c)
                               else features.mean(axis=0) for c in range(n_classes)])
        centred = features - self.means[classes]
        covariance = centred.T @ centred / len(features)
        covariance += ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
        self.precision = np.linalg.inv(covariance)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        diff = features.astype(np.float64)[:, None, :] - self.means[None]          # [N, K, D]
        d2 = np.einsum("nkd,de,nke->nk", diff, self.precision, diff)
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def all_scores(groups: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """name of score -> group -> scores; the groups include 'fit' and 'calibration' (the reference's parts)."""
    from agent.detect.adversarial.graph import FeatureSqueezingDetector
    from agent.detect.calibration.autoencoder_training import TrainingRecipe, reconstruct, train_autoencoder

    model_path = mnist_torch.model_path(VERSION)
    groups = {"fit": reference[FIT], "calibration": reference[CALIBRATION], **groups}
    squeezing = FeatureSqueezingDetector(model_path, "bit_depth:1,median:2", device="cpu")
    plain = session(with_penultimate_output(model_path))
    scores: dict[str, dict[str, np.ndarray]] = {"squeezing": {}}
    probabilities, features = {}, {}
    for name, x in groups.items():
        scores["squeezing"][name] = squeezing.score(x).scores.astype(np.float64)
        probabilities[name], features[name] = run_batches(plain, x, ["probabilities", PENULTIMATE])

    maha = Mahalanobis().fit(features["fit"], probabilities["fit"].argmax(axis=1), 10)
    scores["mahalanobis"] = {name: maha.score(f) for name, f in features.items()}

    for ae_name, options in AUTOENCODERS.items():
        started = time.perf_counter()
        model = train_autoencoder(groups["fit"], TrainingRecipe(**options))
        log(f"{ae_name}: trained in {time.perf_counter() - started:.0f} s")
        for name, x in groups.items():
            recon = reconstruct(model, x)
            diff = (x - recon).reshape(len(x), -1).astype(np.float64)
            scores.setdefault(f"{ae_name}_l1", {})[name] = np.abs(diff).mean(axis=1)
            scores.setdefault(f"{ae_name}_l2", {})[name] = (diff ** 2).mean(axis=1)
            (recon_probabilities,) = run_batches(plain, recon, ["probabilities"])
            for t in TEMPERATURES:
                scores.setdefault(f"{ae_name}_jsd_{t:g}", {})[name] = jsd(probabilities[name], recon_probabilities, t)
    return scores


def evaluate(scores: dict, attacks: list[str]) -> dict:
    from agent.detect.calibration.threshold import joint_thresholds

    single = {}
    for score_name, by_group in scores.items():
        single[score_name] = {
            "roc_auc": {a: adversarial.roc_auc(by_group[a], by_group["held_out_benign"]) for a in attacks},
            "fit_vs_calibration_median": [float(np.median(by_group["fit"])), float(np.median(by_group["calibration"]))],
        }
    combos = [("squeezing",)] + [("squeezing", name) for name in scores if name != "squeezing"]
    best_ae = [n for n in scores if n.startswith("ae_")]
    combos += [("squeezing", "mahalanobis", n) for n in best_ae if n.endswith("_l2") or n.endswith("_l1")]
    combined = {}
    for combo in combos:
        calibration = np.stack([scores[n]["calibration"] for n in combo], axis=1)
        thresholds = joint_thresholds(calibration, TARGET_FPR)

        def flagged(group):
            return np.any(np.stack([scores[n][group] for n in combo], axis=1) > thresholds, axis=1)

        def statistic(group):
            return np.max(np.stack([scores[n][group] for n in combo], axis=1) / thresholds, axis=1)

        benign = statistic("held_out_benign")
        detection = {a: float(flagged(a).mean()) for a in attacks}
        first = [a for a in attacks if a in ("fgsm", "bim", "pgd", "cw2_next")]
        first_flags = np.concatenate([flagged(a) for a in first])
        combined["+".join(combo)] = {
            "thresholds": thresholds.tolist(),
            "calibration_fpr": float(flagged("calibration").mean()),
            "held_out_fpr": float(flagged("held_out_benign").mean()),
            "detection": detection,
            "detection_first_group": float(first_flags.mean()),
            "roc_auc": {a: adversarial.roc_auc(statistic(a), benign) for a in attacks},
        }
    return {"single": single, "combined": combined}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--held-out", type=int, default=5000, help="held-out benign test images (default 5000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    with np.load(REFERENCE) as data:
        reference = (data["x"].astype(np.float32) / 255.0)[:, None]
    x, y, seed_idx = adversarial.load_seeds(VERSION, 1000)
    module = mnist_torch.load_torch_model(VERSION)
    groups = {"held_out_benign": x[adversarial.HELD_OUT[0]:adversarial.HELD_OUT[0] + args.held_out]}
    attacks = [name for name in adversarial.ATTACKS if not adversarial.ATTACKS[name].get("adaptive")]
    for name in attacks:
        adv, _, _ = adversarial.cached_attack(name, VERSION, module, x[seed_idx], y[seed_idx], seed_idx)
        success = adversarial.succeeded(name, mnist_torch.onnx_probabilities(VERSION, adv).argmax(axis=1), y[seed_idx])
        groups[name] = adv[success]
        log(f"{name}: {int(success.sum())} successful examples")
    scores = all_scores(groups, reference)
    result = {"benchmark": "bench/adversarial_candidates.py", "target_fpr": TARGET_FPR,
              "successful": {a: len(groups[a]) for a in attacks}, **evaluate(scores, attacks),
              "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, attacks)
    return 0


def print_table(result: dict, attacks: list[str]) -> None:
    short = {a: a.replace("cw2_", "cw") for a in attacks}
    print("ROC-AUC per score against held-out benign")
    print(f"{'score':<26}" + "".join(f"{short[a]:>9}" for a in attacks))
    for name, s in result["single"].items():
        print(f"{name:<26}" + "".join(f"{s['roc_auc'][a]:>9.4f}" for a in attacks))
    print(f"\nJOINT calibration at {100 * result['target_fpr']:.0f}% on the 2,000 calibration images: detection rate")
    print(f"{'combination':<44}{'FPR':>6}{'grp1':>7}" + "".join(f"{short[a]:>9}" for a in attacks))
    for name, c in result["combined"].items():
        print(f"{name.replace('squeezing', 'sq'):<44}{100 * c['held_out_fpr']:>5.1f}%{100 * c['detection_first_group']:>6.1f}%"
              + "".join(f"{100 * c['detection'][a]:>8.1f}%" for a in attacks))


if __name__ == "__main__":
    sys.exit(main())
