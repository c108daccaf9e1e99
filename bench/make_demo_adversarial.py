#!/usr/bin/env python3
"""Write the demo's adversarial examples: ``python bench/make_demo_adversarial.py`` (needs the train extra).

The demo sends unversioned requests, which the model server answers with the latest version, 2;
so the examples attack version 2's weights (rebuilt in torch from its ONNX file by
bench/mnist_torch.py). PGD with an L-infinity budget of 0.3 (40 steps of 0.01, from a random start)
on demo-sample images the model gets right; only successful examples are kept, as in the feature
squeezing paper. Reproducible: fixed seed, deterministic torch.

It lives in bench/, outside the runtime package, because it needs torch; `make model` runs it after
training. (tests/data/adversarial_mnist.npz, the tests' own examples, comes from
bench/make_adversarial_testdata.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from mnist_torch import load_torch_model  # noqa: E402

from agent.demo.data import ADVERSARIAL, load_images  # noqa: E402

VERSION = "2"
EPSILON, STEP, STEPS = 0.3, 0.01, 40
CANDIDATES = 300
SEED = 20241124


def pgd(module, x, y, torch):
    generator = torch.Generator().manual_seed(SEED)
    start = x + (torch.rand(x.shape, generator=generator) * 2 - 1) * EPSILON
    adversarial = start.clamp(0, 1).detach()
    for _ in range(STEPS):
        adversarial.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(module(adversarial), y)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        adversarial = adversarial.detach() + STEP * gradient.sign()
        adversarial = torch.min(torch.max(adversarial, x - EPSILON), x + EPSILON).clamp(0, 1)
    return adversarial.detach()


def main() -> int:
    import torch

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    module = load_torch_model(VERSION).eval()
    images, labels = load_images()
    x = torch.from_numpy(images[-CANDIDATES:])
    y = torch.from_numpy(labels[-CANDIDATES:])
    with torch.no_grad():
        correct = module(x).argmax(1) == y
    x, y = x[correct], y[correct]
    adversarial = pgd(module, x, y, torch)
    with torch.no_grad():
        fooled = (module(adversarial).argmax(1) != y).numpy()
    np.savez_compressed(ADVERSARIAL, x=adversarial.numpy()[fooled].astype(np.float32), y=y.numpy()[fooled].astype(np.uint8),
                        attack=np.array(f"PGD Linf eps={EPSILON}, {STEPS} steps of {STEP}, against version {VERSION}"))
    print(f"wrote {ADVERSARIAL}: {int(fooled.sum())} successful of {len(y)} correctly classified images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
