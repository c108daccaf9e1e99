"""Training the autoencoder detector on benign data, with torch, and exporting it to ONNX.

Only ``sidewatch calibrate`` trains: torch is the ``train`` extra, imported here inside the functions,
never by the sidecar, which runs the exported ONNX graph alone (agent.detect.adversarial.autoencoder).

The network is MagNet's MNIST detector (Meng and Chen, CCS 2017): a small convolutional autoencoder
with sigmoid activations, trained to reproduce benign inputs with Gaussian noise added (the noise keeps
it from learning the identity). An input far from the benign data comes back changed; the detector's
score is the reconstruction error. Architectures (``C`` input channels, ``K`` filters, 3x3 convolutions
with same padding):

``magnet_ii``  Conv(C->K) Sigmoid, Conv(K->K) Sigmoid, Conv(K->C) Sigmoid         (any H, W)
``magnet_i``   Conv(C->K) Sigmoid, AvgPool 2, Conv(K->K) Sigmoid, Conv(K->K) Sigmoid,
               Upsample 2 (nearest), Conv(K->K) Sigmoid, Conv(K->C) Sigmoid      (even H, W)

The output is in [0, 1] like the input (sidewatch's images are scaled to [0, 1]).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from agent.detect.calibration import CalibrationError

ARCHITECTURES = ("magnet_i", "magnet_ii")
INPUT_NAME = "x"
OUTPUT_NAME = "reconstruction"
TRAIN_EXTRA = ("sidewatch: training the autoencoder detector needs torch, which is not installed; install the "
               "train extra (pip install 'sidewatch[train]') or calibrate feature squeezing alone "
               "(--detectors feature_squeezing)")


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
    weight_decay: float = 1e-9  # MagNet's L2 regularisation
    seed: int = 0
    threads: int = 2            # torch's intra-op threads: the result depends on how sums are split

    def as_dict(self) -> dict:
        return asdict(self)


def import_torch():
    try:
        import torch
    except ImportError as err:
        raise CalibrationError(TRAIN_EXTRA) from err
    return torch


def build_autoencoder(torch, channels: int, recipe: TrainingRecipe):
    nn = torch.nn
    k = recipe.filters

    def conv(a: int, b: int):
        return [nn.Conv2d(a, b, kernel_size=3, padding=1), nn.Sigmoid()]

    if recipe.architecture == "magnet_ii":
        return nn.Sequential(*conv(channels, k), *conv(k, k), *conv(k, channels))
    if recipe.architecture == "magnet_i":
        return nn.Sequential(*conv(channels, k), nn.AvgPool2d(2), *conv(k, k), *conv(k, k),
                             nn.Upsample(scale_factor=2, mode="nearest"), *conv(k, k), *conv(k, channels))
    raise CalibrationError(f"sidewatch: unknown autoencoder architecture {recipe.architecture!r} "
                           f"(one of {', '.join(ARCHITECTURES)})")


def check_input(x: np.ndarray, recipe: TrainingRecipe) -> None:
    if x.ndim != 4:
        raise CalibrationError(f"sidewatch: the autoencoder detector needs image inputs [N, C, H, W], got shape "
                               f"{list(x.shape)}")
    if recipe.architecture == "magnet_i" and (x.shape[2] % 2 or x.shape[3] % 2):
        raise CalibrationError(f"sidewatch: the magnet_i autoencoder needs an even height and width, got "
                               f"{x.shape[2]}x{x.shape[3]} (use magnet_ii)")
    if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise CalibrationError("sidewatch: the autoencoder detector needs inputs scaled to [0, 1]; the reference "
                               f"spans [{float(x.min()):.3g}, {float(x.max()):.3g}]")


def train_autoencoder(x: np.ndarray, recipe: TrainingRecipe = TrainingRecipe()):
    """A torch autoencoder (eval mode) trained on benign ``x`` [N, C, H, W] in [0, 1]: MSE on noisy copies."""
    torch = import_torch()
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_input(x, recipe)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    # Sigmoid gradients underflow to denormals, which the CPU handles slowly: flushed, training is ~1.5x faster.
    torch.set_flush_denormal(True)
    try:
        generator = torch.Generator().manual_seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        model = build_autoencoder(torch, x.shape[1], recipe)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        data = torch.from_numpy(x)
        model.train()
        for _ in range(recipe.epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), recipe.batch_size):
                batch = data[order[start:start + recipe.batch_size]]
                if recipe.contrast or recipe.brightness:
                    shape = (len(batch),) + (1,) * (batch.ndim - 1)
                    scale = 1.0 + recipe.contrast * (2 * torch.rand(shape, generator=generator) - 1)
                    offset = recipe.brightness * torch.rand(shape, generator=generator)
                    batch = (batch * scale + offset).clamp(0.0, 1.0)
                noisy = (batch + recipe.noise * torch.randn(batch.shape, generator=generator)).clamp(0.0, 1.0)
                loss = torch.mean((model(noisy) - batch) ** 2)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        return model
    finally:
        torch.set_num_threads(previous_threads)
        torch.set_flush_denormal(False)


def reconstruct(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """The torch autoencoder's output on ``x`` (for checks and benchmarks; the sidecar runs the ONNX graph)."""
    torch = import_torch()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))).numpy()
                               for i in range(0, len(x), batch)]) if len(x) else np.zeros_like(x)


def export_onnx(model, example: np.ndarray, opset: int) -> bytes:
    """The autoencoder as ONNX bytes: input ``x`` and output ``reconstruction``, both [N, C, H, W], N dynamic."""
    torch = import_torch()
    buffer = io.BytesIO()
    sample = torch.from_numpy(np.ascontiguousarray(example[:1], dtype=np.float32))
    # The TorchScript exporter (dynamo=False) writes plain ONNX ops with no onnxscript dependency; torch
    # warns that it is the legacy one, which is the point here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (sample,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    return buffer.getvalue()
