"""The autoencoder detector's network in numpy: its layers, forward and backward, for training at calibration.

The network is MagNet's MNIST detector (Meng and Chen, CCS 2017): a small convolutional autoencoder with
sigmoid activations. Architectures (``C`` input channels, ``K`` filters, 3x3 convolutions with same padding):

``magnet_ii``  Conv(C->K) Sigmoid, Conv(K->K) Sigmoid, Conv(K->C) Sigmoid         (any H, W)
``magnet_i``   Conv(C->K) Sigmoid, AvgPool 2, Conv(K->K) Sigmoid, Conv(K->K) Sigmoid,
               Upsample 2 (nearest), Conv(K->K) Sigmoid, Conv(K->C) Sigmoid      (even H, W)

How a convolution is computed, and why: each activation is kept as ``[C, N, H + 2, W + 2]``, every image
with a border of zeros (the same padding), flattened to ``[C, N * (H + 2) * (W + 2)]``. In that flat
form a neighbour of a pixel is a fixed offset away (one row is ``W + 2`` along), so the nine shifted
copies of the input that a 3x3 convolution multiplies ("im2col", ``[9 * C, positions]``) are nine
contiguous slices, copied at memory speed; the convolution is then one matrix product with the kernel as
``[K, 9 * C]``. Border positions get outputs too, which are thrown away (set to zero, which is also the
next layer's padding). Contiguous slices matter: with 12 channels, copying pixel by pixel neighbourhoods
channels-last was five times slower than the arithmetic. Everything is float32, as the sidecar's ONNX
graph is; weights are stored as ONNX's Conv wants them, ``[K, C, 3, 3]``.

>>> net = Autoencoder.initial("magnet_i", channels=1, filters=4, rng=np.random.default_rng(0))
>>> x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
>>> net.forward(x).shape
(2, 1, 8, 8)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ARCHITECTURES = ("magnet_i", "magnet_ii")
# The layers in order; every convolution is followed by a sigmoid.
LAYOUTS = {
    "magnet_ii": ("conv", "conv", "conv"),
    "magnet_i": ("conv", "pool", "conv", "conv", "upsample", "conv", "conv"),
}


def padded(interior: np.ndarray) -> np.ndarray:
    """[C, N, H, W] -> [C, N, H + 2, W + 2] with a border of zeros around each image."""
    c, n, h, w = interior.shape
    out = np.zeros((c, n, h + 2, w + 2), dtype=np.float32)
    out[:, :, 1:-1, 1:-1] = interior
    return out


def inside(grid: np.ndarray) -> np.ndarray:
    """The images without their borders: [C, N, H + 2, W + 2] -> [C, N, H, W] (a view)."""
    return grid[:, :, 1:-1, 1:-1]


def zero_borders(grid: np.ndarray) -> np.ndarray:
    """``grid`` [C, N, H + 2, W + 2] with its images' borders set to zero, in place."""
    grid[:, :, 0, :] = 0.0
    grid[:, :, -1, :] = 0.0
    grid[:, :, :, 0] = 0.0
    grid[:, :, :, -1] = 0.0
    return grid


def im2col(grid: np.ndarray, ones: bool) -> np.ndarray:
    """[C, N, H + 2, W + 2] -> [9 * C (+ 1), positions]: row ``k * C + c`` holds channel c at the k-th 3x3
    offset (row-major over (di, dj)) of each position from the first to the last one with a full
    neighbourhood; with ``ones``, a last row of ones (the bias is the weight of an input that is always 1,
    which saves a pass over the output to add it and one over the gradient to sum it)."""
    c = grid.shape[0]
    row = grid.shape[3]
    flat = grid.reshape(c, -1)
    margin = row + 1
    span = flat.shape[1] - 2 * margin
    columns = np.empty((9 * c + ones, span), dtype=np.float32)
    for k, (di, dj) in enumerate((i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)):
        start = margin + di * row + dj
        columns[k * c:(k + 1) * c] = flat[:, start:start + span]
    if ones:
        columns[-1] = 1.0
    return columns


def conv_forward(grid: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A 3x3 convolution with same padding of ``grid`` [C, N, H + 2, W + 2]: (the output [K, N, H + 2, W + 2],
    garbage on the borders; im2col of the input, for the backward pass)."""
    k, c = weight.shape[:2]
    kernel = weight.transpose(0, 2, 3, 1).reshape(k, 9 * c)
    if bias is not None:
        kernel = np.concatenate([kernel, bias[:, None]], axis=1)
    columns = im2col(grid, ones=bias is not None)
    margin = grid.shape[3] + 1
    out = np.empty((k, grid[0].size), dtype=np.float32)
    out[:, :margin] = 0.0
    out[:, -margin:] = 0.0
    np.matmul(kernel, columns, out=out[:, margin:-margin])
    return out.reshape((k,) + grid.shape[1:]), columns


def conv_backward(grad_out: np.ndarray, columns: np.ndarray, weight: np.ndarray,
                  need_input_grad: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(gradient for the input grid or None, for the weight, for the bias) of :func:`conv_forward` with a
    bias, given the output's gradient ``grad_out`` [K, N, H + 2, W + 2], zero on the borders."""
    k, c = weight.shape[:2]
    flat = grad_out.reshape(k, -1)
    margin = grad_out.shape[3] + 1
    grad_kernel = flat[:, margin:-margin] @ columns.T
    grad_weight = grad_kernel[:, :-1].reshape(k, 3, 3, c).transpose(0, 3, 1, 2)
    grad_bias = grad_kernel[:, -1]
    grad_input = None
    if need_input_grad:
        # With stride 1 and same padding, the input's gradient is the same convolution of the output's
        # gradient with the kernel turned by 180 degrees and its input and output channels swapped.
        turned = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        grad_input, _ = conv_forward(grad_out, turned, bias=None)
    return grad_input, grad_weight, grad_bias


def sigmoid_in_place(x: np.ndarray) -> np.ndarray:
    # exp of a large positive argument overflows to inf, which gives the right limit 0; keep numpy quiet.
    with np.errstate(over="ignore"):
        np.negative(x, out=x)
        np.exp(x, out=x)
        x += 1.0
        return np.reciprocal(x, out=x)


# Pooling and upsampling by 2 work on the four pixels of each 2x2 block: strided views, one per place in
# the block (a reshape to [..., H / 2, 2, W / 2, 2] and a mean over two axes was several times slower).
BLOCK = ((0, 0), (0, 1), (1, 0), (1, 1))


def pool_forward(grid: np.ndarray) -> np.ndarray:
    # Average pooling is a quarter of the sum that upsampling's backward pass takes (each is the other's adjoint).
    out = upsample_backward(grid)
    out *= 0.25
    return out


def pool_backward(grad_out: np.ndarray) -> np.ndarray:
    out = upsample_forward(grad_out)
    out *= 0.25
    return out


def upsample_forward(grid: np.ndarray) -> np.ndarray:
    c, n, h, w = inside(grid).shape
    out = np.zeros((c, n, 2 * h + 2, 2 * w + 2), dtype=np.float32)
    for i, j in BLOCK:
        out[:, :, 1 + i:2 * h + 1:2, 1 + j:2 * w + 1:2] = inside(grid)
    return out


def upsample_backward(grad_out: np.ndarray) -> np.ndarray:
    c, n, h, w = inside(grad_out).shape
    out = np.zeros((c, n, h // 2 + 2, w // 2 + 2), dtype=np.float32)
    summed = inside(out)
    for i, j in BLOCK:
        summed += grad_out[:, :, 1 + i:h + 1:2, 1 + j:w + 1:2]
    return out


@dataclass
class Autoencoder:
    """The network's architecture and its parameters: ``weights[i]`` [K, C, 3, 3] and ``biases[i]`` [K] of
    the i-th convolution, float32."""

    architecture: str
    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @classmethod
    def initial(cls, architecture: str, channels: int, filters: int, rng: np.random.Generator) -> Autoencoder:
        """Fresh parameters, uniform in +-1/sqrt(fan in) (He et al.'s uniform rule with a = sqrt(5), the usual
        default for convolutions), weights and biases alike."""
        convolutions = LAYOUTS[architecture].count("conv")
        sizes = [channels] + [filters] * (convolutions - 1) + [channels]
        weights, biases = [], []
        for c_in, c_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / np.sqrt(9 * c_in)
            weights.append(rng.uniform(-bound, bound, (c_out, c_in, 3, 3)).astype(np.float32))
            biases.append(rng.uniform(-bound, bound, c_out).astype(np.float32))
        return cls(architecture, weights, biases)

    def parameters(self) -> list[np.ndarray]:
        return [*self.weights, *self.biases]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The reconstruction of ``x`` [N, C, H, W]."""
        out, _ = self.forward_with_cache(x)
        return out

    def forward_with_cache(self, x: np.ndarray) -> tuple[np.ndarray, list]:
        """(reconstruction [N, C, H, W], what :meth:`backward` needs)."""
        grid = padded(np.asarray(x, dtype=np.float32).transpose(1, 0, 2, 3))
        cache = []
        conv = 0
        for layer in LAYOUTS[self.architecture]:
            if layer == "conv":
                pre, columns = conv_forward(grid, self.weights[conv], self.biases[conv])
                grid = zero_borders(sigmoid_in_place(pre))   # the borders back to zero: the next layer's padding
                cache.append((columns, grid))
                conv += 1
            else:
                grid = pool_forward(grid) if layer == "pool" else upsample_forward(grid)
                cache.append(None)
        return np.ascontiguousarray(inside(grid).transpose(1, 0, 2, 3)), cache

    def backward(self, grad_out: np.ndarray, cache: list) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The gradients (for the weights, for the biases) of a loss whose gradient for the reconstruction
        is ``grad_out`` [N, C, H, W]."""
        grad = padded(np.asarray(grad_out, dtype=np.float32).transpose(1, 0, 2, 3))
        grad_weights: list = [None] * len(self.weights)
        grad_biases: list = [None] * len(self.biases)
        conv = len(self.weights)
        for index in reversed(range(len(cache))):
            layer = LAYOUTS[self.architecture][index]
            if layer == "conv":
                conv -= 1
                columns, activation = cache[index]
                through_sigmoid = 1.0 - activation   # the sigmoid's derivative s (1 - s); zero on the borders
                through_sigmoid *= activation
                through_sigmoid *= grad
                grad = through_sigmoid
                grad, grad_weights[conv], grad_biases[conv] = conv_backward(grad, columns, self.weights[conv],
                                                                            need_input_grad=index > 0)
                if grad is not None:
                    zero_borders(grad)
            else:
                grad = pool_backward(grad) if layer == "pool" else upsample_backward(grad)
        return grad_weights, grad_biases

