#!/usr/bin/env python3
"""An adaptive white-box attack on sidewatch's calibrated detector: it knows the squeezers, the autoencoder,
the thresholds, and puts the detector's score in its loss (Tramer et al., NeurIPS 2020, ask for one).

The fused detector is rebuilt in torch from the calibration artifact (``DetectorSurrogate``): the model
(bench/mnist_torch.py), each squeezer, the autoencoder (its ONNX weights loaded into the training
architecture) and the joint thresholds, giving every detector's score over its threshold, whose largest
is the sidecar's combined score. Rounding (bit depth) has no useful gradient, so it is passed straight
through (BPDA, Athalye, Carlini and Wagner, ICML 2018); the median is a sort, differentiable as it is.

The attack minimises, with Adam on the perturbation (pixels kept in [0, 1]), the true class's logit margin
(until the input is misclassified by ``kappa`` logits) plus ``weight`` times how far each detector's score
is above ``slack`` times its threshold: the penalty form of Carlini and Wagner's attacks on detectors
("Adversarial examples are not easily detected", AISec 2017), which also broke MagNet. It runs at several
weights, and each example keeps, over all steps and weights, the iterate with the lowest combined score
among those misclassified. No L2 or L-infinity bound: the attack may change the image as much as it likes,
as long as the model is fooled and the detector is not.

``python bench/adaptive_attack.py [cifar10_cnn]`` checks the surrogate against the fused ONNX graph on benign and
noisy inputs. ``models`` below is bench/mnist_torch.py (the bundled model, the default) or bench/cifar10_torch.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import cifar10_torch  # noqa: E402
import mnist_torch  # noqa: E402

from agent.detect.adversarial.squeeze import BitDepth, Median, median_window, parse_squeezers  # noqa: E402
from agent.detect.calibration.artifact import ARTIFACT_FILE, autoencoder_bytes, load_artifact  # noqa: E402
from agent.detect.calibration.autoencoder_network import LAYOUTS  # noqa: E402

MODELS = {module.MODEL: module for module in (mnist_torch, cifar10_torch)}


def artifact_path(version: str, models=mnist_torch) -> Path:
    return models.model_path(version).with_name(ARTIFACT_FILE)


def build_autoencoder(torch, architecture: str, channels: int, filters: int):
    """agent.detect.calibration.autoencoder_network's network as a torch module (the same layers in order)."""
    nn = torch.nn
    convolutions = LAYOUTS[architecture].count("conv")
    sizes = [channels] + [filters] * (convolutions - 1) + [channels]
    layers, conv = [], 0
    for layer in LAYOUTS[architecture]:
        if layer == "conv":
            layers += [nn.Conv2d(sizes[conv], sizes[conv + 1], kernel_size=3, padding=1), nn.Sigmoid()]
            conv += 1
        elif layer == "pool":
            layers.append(nn.AvgPool2d(2))
        else:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    return nn.Sequential(*layers)


def load_autoencoder(torch, entry: dict, channels: int):
    """The artifact's autoencoder as a torch module: the weights of its ONNX graph's Conv nodes, in graph
    order, into the training architecture's convolutions."""
    import onnx
    from onnx import numpy_helper

    training = entry["training"]
    module = build_autoencoder(torch, training["architecture"], channels, training["filters"])
    graph = onnx.load_from_string(autoencoder_bytes(entry)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    layers = [layer for layer in module if isinstance(layer, torch.nn.Conv2d)]
    if len(convs) != len(layers):
        raise SystemExit(f"the autoencoder has {len(convs)} convolutions, its architecture {len(layers)}")
    for node, layer in zip(convs, layers):
        layer.weight.data = torch.from_numpy(initializers[node.input[1]].copy())
        layer.bias.data = torch.from_numpy(initializers[node.input[2]].copy())
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class DetectorSurrogate:
    """The calibrated fused detector of ``version`` in torch: ``ratios(x)`` -> (logits [N, C], [N, D] each
    detector's score over its threshold)."""

    def __init__(self, version: str, models=mnist_torch):
        import torch

        self.torch = torch
        artifact = load_artifact(artifact_path(version, models), models.model_path(version))
        if artifact.autoencoder is None:
            raise SystemExit(f"{artifact_path(version, models)} has no autoencoder detector; recalibrate it first")
        self.artifact = artifact
        self.model = models.load_torch_model(version)
        self.squeezers = parse_squeezers(artifact.squeezers)
        self.autoencoder = load_autoencoder(torch, artifact.autoencoder, models.CHANNELS)
        self.error = artifact.autoencoder["error"]
        self.thresholds = torch.tensor(artifact.detector_thresholds, dtype=torch.float32)

    def squeeze(self, x, squeezer):
        torch = self.torch
        if isinstance(squeezer, BitDepth):
            levels = 2 ** squeezer.bits - 1
            return x + (torch.round(x * levels) / levels - x).detach()   # BPDA: identity gradient
        if isinstance(squeezer, Median):
            before, after = median_window(squeezer.size)
            # scipy's 'reflect' (numpy 'symmetric') mirrors with the edge repeated: for margins of one pixel
            # that is 'replicate'.
            if max(before, after) > 1:
                raise SystemExit(f"{squeezer}: only windows of up to 3 are rebuilt here")
            padded = torch.nn.functional.pad(x, (before, after, before, after), mode="replicate")
            h, w = x.shape[-2:]
            shifts = [padded[..., dy:dy + h, dx:dx + w] for dy in range(squeezer.size) for dx in range(squeezer.size)]
            stack = torch.stack(shifts, dim=-1)
            return torch.sort(stack, dim=-1).values[..., (squeezer.size ** 2) // 2]
        raise SystemExit(f"{squeezer}: not rebuilt in torch")

    def ratios(self, x):
        torch = self.torch
        logits = self.model(x)
        p = torch.softmax(logits, dim=1)
        l1 = [torch.sum(torch.abs(torch.softmax(self.model(self.squeeze(x, s)), dim=1) - p), dim=1)
              for s in self.squeezers]
        squeezing = torch.stack(l1, dim=1).max(dim=1).values
        difference = x - self.autoencoder(x)
        elementwise = difference.abs() if self.error == "l1" else difference * difference
        reconstruction = elementwise.flatten(1).mean(dim=1)
        return logits, torch.stack([squeezing, reconstruction], dim=1) / self.thresholds


def penalty_attack(surrogate: DetectorSurrogate, x: np.ndarray, labels: np.ndarray, weight: float, max_iter: int,
                   learning_rate: float, kappa: float, slack: float, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(adversarial x, its combined score as the surrogate sees it: inf where never misclassified)."""
    torch = surrogate.torch
    out, scores = np.empty_like(x), np.full(len(x), np.inf, dtype=np.float32)
    for start in range(0, len(x), batch):
        clean = torch.from_numpy(np.ascontiguousarray(x[start:start + batch]))
        y = torch.from_numpy(labels[start:start + batch].astype(np.int64))
        delta = torch.zeros_like(clean, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=learning_rate)
        best, best_score = clean.clone(), torch.full((len(clean),), float("inf"))
        for step in range(max_iter + 1):
            adv = (clean + delta).clamp(0.0, 1.0)
            logits, ratios = surrogate.ratios(adv)
            combined = ratios.max(dim=1).values
            true = logits.gather(1, y[:, None])[:, 0]
            other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -1e9).max(dim=1).values
            margin = true - other                                  # < 0: misclassified
            with torch.no_grad():
                better = (margin < 0) & (combined < best_score)
                best[better], best_score[better] = adv.detach()[better], combined.detach()[better]
            if step == max_iter:
                break
            # Misclassify by kappa logits, and keep every detector's score under `slack` times its threshold.
            loss = (torch.relu(margin + kappa) + weight * torch.relu(ratios - slack).sum(dim=1)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        never = torch.isinf(best_score)
        best[never] = (clean + delta.detach()).clamp(0.0, 1.0)[never]
        out[start:start + len(clean)] = best.numpy()
        scores[start:start + len(clean)] = best_score.numpy()
    return out, scores


def attack(version: str, x: np.ndarray, labels: np.ndarray, parameters: dict, models=mnist_torch) -> np.ndarray:
    """The attack at each weight of the detector term; per example, the result with the lowest combined score
    among those misclassified (as a CW binary search over the constant would pick)."""
    surrogate = DetectorSurrogate(version, models)
    best, best_scores = x.copy(), np.full(len(x), np.inf, dtype=np.float32)
    for weight in parameters["weights"]:
        adversarial, scores = penalty_attack(surrogate, x, labels, weight, parameters["max_iter"],
                                             parameters["learning_rate"], parameters["kappa"], parameters["slack"])
        better = scores < best_scores
        best[better], best_scores[better] = adversarial[better], scores[better]
        never = np.isinf(best_scores)
        best[never] = adversarial[never]
    return best.astype(np.float32)


def check(version: str = "1", images: int = 200, models=mnist_torch) -> float:
    """Largest |surrogate - fused ONNX| over the detector scores (as ratios) of benign and noisy test images."""
    import torch

    surrogate = DetectorSurrogate(version, models)
    model_path = models.model_path(version)
    detector = surrogate.artifact.make_detector(model_path, device="cpu")
    x, _ = models.test_data()
    x = np.ascontiguousarray(x[:images])
    noisy = np.clip(x + np.random.default_rng(0).uniform(-0.3, 0.3, x.shape), 0, 1).astype(np.float32)
    worst = 0.0
    for batch in (x, noisy):
        with torch.no_grad():
            ratios = surrogate.ratios(torch.from_numpy(batch))[1].numpy()
        onnx_ratios = detector.score(batch).detector_scores / np.asarray(surrogate.artifact.detector_thresholds)
        worst = max(worst, float(np.abs(ratios - onnx_ratios).max()))
    return worst


if __name__ == "__main__":
    difference = check(models=MODELS[sys.argv[1] if len(sys.argv) > 1 else "mnist_cnn"])
    print(f"largest |torch surrogate - fused ONNX| of a detector's score over its threshold: {difference:.3g}")
    sys.exit(0 if difference < 1e-3 else 1)

