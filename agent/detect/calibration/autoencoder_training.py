"""Training the autoencoder detector on benign data, in numpy (agent.detect.calibration.autoencoder_network).

Only ``sidewatch calibrate`` trains; the sidecar runs the exported ONNX graph alone
(agent.detect.calibration.autoencoder_export, agent.detect.adversarial.autoencoder). Training needs
nothing beyond the runtime's own numpy: no torch.

As in MagNet (Meng and Chen, CCS 2017), the autoencoder learns to reproduce benign inputs from copies with
Gaussian noise added (the noise keeps it from learning the identity), by mean squared error, with Adam
(Kingma and Ba 2015) and a small L2 weight penalty. An input far from the benign data comes back changed;
the detector's score is the reconstruction error. The output is in [0, 1] like the input (sidewatch's
images are scaled to [0, 1]).

>>> x = np.random.default_rng(0).random((8, 1, 4, 4), dtype=np.float32)
>>> net = train_autoencoder(x, TrainingRecipe(filters=2, epochs=1, batch_size=4))
>>> reconstruct(net, x).shape
(8, 1, 4, 4)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from agent.detect.calibration import CalibrationError
from agent.detect.calibration.autoencoder_network import ARCHITECTURES, Autoencoder


@dataclass(frozen=True)
class TrainingRecipe:
    """How the autoencoder is trained; recorded in the calibration artifact.

    The defaults are MagNet's MNIST detector with 12 filters instead of 3, a faster schedule and brighter
    copies of the training images, chosen on the bundled model (bench/adversarial_candidates.py,
    bench/README.md): with 3,000 training images MagNet's own 3 filters stay far from converged, and 16
    filters reproduce perturbations too well.
    """

    architecture: str = "magnet_i"
    filters: int = 12
    epochs: int = 120
    batch_size: int = 64
    learning_rate: float = 3e-3
    noise: float = 0.1          # std of the Gaussian noise added to training inputs (then clipped to [0, 1])
    # Photometric augmentation: each training image is scaled by a factor drawn from [1 - contrast, 1 + contrast]
    # and shifted by an offset drawn from [0, brightness], so that the autoencoder reproduces benign changes
    # of exposure (the drift detectors' business) and its error is kept for what no benign image looks like.
    # Without it every brightened digit of the demo's drift (x * 1.6 + 0.25) was flagged; with brightness 0.3
    # under 1% are (bench/README.md). Contrast 0.5 cost CW detection; darker digits (x 0.6) are still flagged.
    contrast: float = 0.0
    brightness: float = 0.3
    weight_decay: float = 1e-9  # MagNet's L2 regularisation (added to the gradient, as Adam's L2 penalty)
    seed: int = 0
    # Each batch is cut into this many shards whose gradients are computed in parallel threads (numpy lets go
    # of the GIL in its copies and matrix products), then added in a fixed order: the same parameters for a
    # given count. The matrix products themselves get one BLAS thread each: they are small (12 x 109 by
    # 109 x 58,000), and with BLAS threads on a machine whose cores were busy, OpenBLAS's threads waited for
    # each other (a training step took 3-10 times as long).
    threads: int = 2

    def as_dict(self) -> dict:
        return asdict(self)


ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


class Adam:
    """Adam with an L2 penalty added to the gradient (Kingma and Ba 2015, Algorithm 1), updating in place."""

    def __init__(self, parameters: list[np.ndarray], learning_rate: float, weight_decay: float):
        self.parameters = parameters
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.first = [np.zeros_like(p) for p in parameters]
        self.second = [np.zeros_like(p) for p in parameters]
        self.steps = 0

    def step(self, gradients: list[np.ndarray]) -> None:
        beta1, beta2 = ADAM_BETAS
        self.steps += 1
        step_size = self.learning_rate / (1.0 - beta1 ** self.steps)
        second_correction = np.sqrt(1.0 - beta2 ** self.steps)
        for parameter, gradient, first, second in zip(self.parameters, gradients, self.first, self.second):
            if self.weight_decay:
                gradient = gradient + self.weight_decay * parameter
            first *= beta1
            first += (1.0 - beta1) * gradient
            second *= beta2
            second += (1.0 - beta2) * gradient * gradient
            parameter -= (step_size * first / (np.sqrt(second) / second_correction + ADAM_EPSILON)).astype(np.float32)


def check_input(x: np.ndarray, recipe: TrainingRecipe) -> None:
    if recipe.architecture not in ARCHITECTURES:
        raise CalibrationError(f"sidewatch: unknown autoencoder architecture {recipe.architecture!r} "
                               f"(one of {', '.join(ARCHITECTURES)})")
    if x.ndim != 4:
        raise CalibrationError(f"sidewatch: the autoencoder detector needs image inputs [N, C, H, W], got shape "
                               f"{list(x.shape)}")
    if recipe.architecture == "magnet_i" and (x.shape[2] % 2 or x.shape[3] % 2):
        raise CalibrationError(f"sidewatch: the magnet_i autoencoder needs an even height and width, got "
                               f"{x.shape[2]}x{x.shape[3]} (use magnet_ii)")
    if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise CalibrationError("sidewatch: the autoencoder detector needs inputs scaled to [0, 1]; the reference "
                               f"spans [{float(x.min()):.3g}, {float(x.max()):.3g}]")


def augmented(batch: np.ndarray, recipe: TrainingRecipe, rng: np.random.Generator) -> np.ndarray:
    """The batch with each image's contrast and brightness changed at random (the recipe's ranges)."""
    if not (recipe.contrast or recipe.brightness):
        return batch
    shape = (len(batch),) + (1,) * (batch.ndim - 1)
    scale = 1.0 + recipe.contrast * (2.0 * rng.random(shape, dtype=np.float32) - 1.0)
    offset = recipe.brightness * rng.random(shape, dtype=np.float32)
    return np.clip(batch * scale + offset, 0.0, 1.0)


def train_autoencoder(x: np.ndarray, recipe: TrainingRecipe = TrainingRecipe()) -> Autoencoder:
    """An autoencoder trained on benign ``x`` [N, C, H, W] in [0, 1]: mean squared error on noisy copies.
    The same ``x`` and recipe give the same parameters (one seeded generator draws every random number)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_input(x, recipe)
    rng = np.random.default_rng(recipe.seed)
    net = Autoencoder.initial(recipe.architecture, x.shape[1], recipe.filters, rng)
    optimizer = Adam(net.parameters(), recipe.learning_rate, recipe.weight_decay)
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(recipe.threads) as pool:
        for _ in range(recipe.epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), recipe.batch_size):
                batch = augmented(x[order[start:start + recipe.batch_size]], recipe, rng)
                noise = rng.standard_normal(batch.shape, dtype=np.float32)
                noisy = np.clip(batch + np.float32(recipe.noise) * noise, 0.0, 1.0)
                # d/d(out) of mean((out - batch)^2) over every element of the whole batch
                scale = np.float32(2.0 / batch.size)
                shards = [rows for rows in np.array_split(np.arange(len(batch)), recipe.threads) if len(rows)]
                parts = pool.map(lambda rows: shard_gradients(net, noisy[rows], batch[rows], scale), shards)
                optimizer.step([sum(same) for same in zip(*parts)])
    return net


def shard_gradients(net: Autoencoder, noisy: np.ndarray, clean: np.ndarray, scale: np.float32) -> list[np.ndarray]:
    """The gradients of the loss's terms of these rows, for every parameter (weights, then biases)."""
    out, cache = net.forward_with_cache(noisy)
    grad_weights, grad_biases = net.backward((out - clean) * scale, cache)
    return [*grad_weights, *grad_biases]


def reconstruct(net: Autoencoder, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """The autoencoder's output on ``x`` (for checks and benchmarks; the sidecar runs the ONNX graph)."""
    x = np.asarray(x, dtype=np.float32)
    if not len(x):
        return np.zeros_like(x)
    return np.concatenate([net.forward(x[i:i + batch]) for i in range(0, len(x), batch)])
