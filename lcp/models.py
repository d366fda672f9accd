"""Equilibrium models: an encoder E, an implicit map f(h, v) and a decoder D(v)
(docs/equations.md, "Models"); trainers use only the methods of `EquilibriumModel`.

The vector–Jacobian products the dynamics need at every step are taken by autograd in the base
class and in closed form by `LinearReadoutModel` (ff, rnn, conv-ff), which keeps autograd out of
the controller loop. Modules are created in the same order as in the paper's code so that,
under the same seed, the initial weights are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcp.config import RunConfig
from lcp.errors import LcpError


class EquilibriumModel(nn.Module):
    name: str = ""
    num_bp_steps: int = 1  # Picard steps the `bp` trainer unrolls from v = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def implicit(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def zero_state(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)

    def implicit_at_zero(self, h: torch.Tensor) -> torch.Tensor:
        """f(h, 0): the first step of the bp unroll."""
        return self.implicit(h, self.zero_state(h))

    def implicit_vjp(self, h, v, e):
        """(f(h, v), (∂f/∂v)ᵀ e), without building a graph into the parameters' grads."""
        return autograd_vjp(lambda v: self.implicit(h.detach(), v), v, e)

    def decode_vjp(self, v, u):
        """(D(v), (∂D/∂v)ᵀ u)."""
        return autograd_vjp(self.decode, v, u)

    def implicit_transpose(self, h, v, e):
        """(∂f/∂v)ᵀ e alone."""
        return self.implicit_vjp(h, v, e)[1]

    def implicit_transpose_at(self, h, v):
        """e ↦ (∂f/∂v at v)ᵀ e, for many e at one v (rbp's adjoint equation)."""
        return autograd_transpose_at(lambda v: self.implicit(h.detach(), v), v)

    def decode_transpose(self, v, u):
        """(∂D/∂v)ᵀ u alone."""
        return self.decode_vjp(v, u)[1]

    def decode_has_side_effects(self) -> bool:
        """Whether calling D changes the model (a BatchNorm in training mode updates its
        running statistics): a solver must then not evaluate extra steps."""
        return False

    def bind(self, h: torch.Tensor) -> "BoundImplicit":
        """f(h, ·) for the no-grad dynamics of one batch, with whatever depends on h alone
        computed once (see `ConvRNNModel`)."""
        return BoundImplicit(self, h)


def autograd_vjp(fn, v, e):
    """(fn(v), (∂fn/∂v)ᵀ e) by autograd, with a graph into v only."""
    with torch.enable_grad():
        v = v.detach().requires_grad_(True)
        out = fn(v)
        (vjp,) = torch.autograd.grad(out, v, e)
    return out.detach(), vjp


def autograd_transpose_at(fn, v):
    """e ↦ (∂fn/∂v at v)ᵀ e by autograd: the graph of fn at v is built once and reused."""
    with torch.enable_grad():
        v = v.detach().requires_grad_(True)
        out = fn(v)
    return lambda e: torch.autograd.grad(out, v, e, retain_graph=True)[0]


class BoundImplicit:
    """f(h, ·) and D for one batch: `f(v)`, `f.transpose(v, e)`, `f.decode(v)`,
    `f.decode_transpose(v, u)` — the small interface the dynamics of every trainer use."""

    def __init__(self, model: EquilibriumModel, h: torch.Tensor):
        self.model, self.h = model, h.detach()

    def __call__(self, v):
        return self.model.implicit(self.h, v)

    def transpose(self, v, e):
        return self.model.implicit_transpose(self.h, v, e)

    def transpose_at(self, v):
        """e ↦ (∂f/∂v at v)ᵀ e: what depends on v alone is computed once."""
        return self.model.implicit_transpose_at(self.h, v)

    def decode(self, v):
        return self.model.decode(v)

    def decode_transpose(self, v, u):
        return self.model.decode_transpose(v, u)


@dataclass(frozen=True)
class Block:
    """One forward block of f: reads state slice [in_start, in_end) (viewed as in_shape) and
    adds its output to slice [out_start, out_end)."""

    in_start: int
    in_end: int
    out_start: int
    out_end: int
    in_shape: tuple[int, ...]  # per-sample shape the layer reads
    conv: dict | None = None  # stride/padding for conv blocks


_ACTIVATIONS = {
    "tanh": (torch.tanh, lambda v: 1 - torch.tanh(v).pow(2)),
    "relu": (torch.relu, lambda v: (v > 0).to(v.dtype)),
}


class LinearReadoutModel(EquilibriumModel):
    """f(h, v) = h + Σ_blocks pad(layer(φ(v_in))), D(v) = W φ(v_readout) + b (ff, rnn, conv-ff)."""

    def __init__(self, name: str, state_size: int, blocks: list[Block], layers: list[nn.Module],
                 encoder: nn.Module, encoded_size: int, readout_start: int, num_classes: int,
                 activation: str):
        super().__init__()
        self.name = name
        self.state_size = state_size
        self.block_specs = blocks
        self.encoded_size = encoded_size  # h occupies [0, encoded_size); the rest of h is 0
        self.readout_start = readout_start
        self.readout_size = state_size - readout_start
        self.num_classes = num_classes
        self.activation = activation
        self.act, self.act_grad = _ACTIVATIONS[activation]
        self.num_bp_steps = len(blocks) + 1
        # the caller creates the layers in the paper's order, which fixes the random draws
        self.encoder = encoder
        self.blocks = nn.ModuleList(layers)
        self.readout = nn.Linear(self.readout_size, num_classes)

    # -- the three maps
    def encode(self, x):
        z = self.encoder(x).flatten(1)
        return F.pad(z, (0, self.state_size - self.encoded_size))

    def _block_outputs(self, hidden):
        for spec, layer in zip(self.block_specs, self.blocks):
            piece = hidden[:, spec.in_start:spec.in_end]
            if spec.conv is not None:
                piece = piece.reshape(-1, *spec.in_shape)
            yield spec, layer(piece).flatten(1)

    def implicit(self, h, v):
        return self._add_to_h(h, (y for _, y in self._block_outputs(self.act(v))))

    def implicit_at_zero(self, h):
        """f(h, 0) without the blocks' products: φ(0) = 0 (tanh, relu), so a block adds its bias
        alone — the values and gradients of `implicit(h, 0)` bit for bit, one step's products
        fewer in the bp unroll."""
        if self.act(torch.zeros(())).item() != 0.0:  # an activation without φ(0) = 0
            return super().implicit_at_zero(h)
        return self._add_to_h(h, (_bias_output(spec, layer)
                                  for spec, layer in zip(self.block_specs, self.blocks)))

    def _add_to_h(self, h, outputs):
        """h with each block's output (per sample, flat) added to its output columns."""
        pieces = []
        cursor = 0
        for spec, y in zip(self.block_specs, outputs):
            if spec.out_start > cursor:
                pieces.append(h[:, cursor:spec.out_start])
            pieces.append(h[:, spec.out_start:spec.out_end] + y)
            cursor = spec.out_end
        if cursor < self.state_size:
            pieces.append(h[:, cursor:])
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]

    def decode(self, v):
        return self.readout(self.act(v[:, self.readout_start:]))

    # -- closed-form vector-Jacobian products
    def _layer_transpose(self, spec: Block, layer: nn.Module, grad_out: torch.Tensor):
        if spec.conv is None:
            return grad_out @ layer.weight
        out_shape = (grad_out.shape[0], layer.out_channels, *_conv_out_hw(spec, layer))
        return torch.nn.grad.conv2d_input(
            (grad_out.shape[0], *spec.in_shape), layer.weight, grad_out.reshape(out_shape),
            stride=spec.conv["stride"], padding=spec.conv["padding"]).flatten(1)

    def implicit_transpose(self, h, v, e):
        return self._transpose_with(self.act_grad(v), e)

    def implicit_transpose_at(self, h, v):
        derivative = self.act_grad(v)  # φ'(v), once for every e
        return lambda e: self._transpose_with(derivative, e)

    def _transpose_with(self, derivative, e):
        """(∂f/∂v)ᵀ e given φ'(v): Σ_b (e_out,b W_b) into block b's input columns, times φ'(v)."""
        vjp = torch.zeros_like(derivative)
        for spec, layer in zip(self.block_specs, self.blocks):
            back = self._layer_transpose(spec, layer, e[:, spec.out_start:spec.out_end])
            vjp[:, spec.in_start:spec.in_end] += back
        return vjp * derivative

    def implicit_vjp(self, h, v, e):
        return self.implicit(h, v), self.implicit_transpose(h, v, e)

    def decode_transpose(self, v, u):
        tail = v[:, self.readout_start:]
        return F.pad((u @ self.readout.weight) * self.act_grad(tail), (self.readout_start, 0))

    def decode_vjp(self, v, u):
        return self.decode(v), self.decode_transpose(v, u)


def _bias_output(spec: Block, layer: nn.Module) -> torch.Tensor:
    """What a block's layer outputs for a zero input: its bias (per channel, repeated over the
    output positions of a convolution, in the flattened C×H×W order)."""
    if layer.bias is None:
        return layer.weight.new_zeros(())
    if spec.conv is None:
        return layer.bias
    return layer.bias.repeat_interleave(math.prod(_conv_out_hw(spec, layer)))


def _conv_out_hw(spec: Block, layer: nn.Conv2d) -> tuple[int, int]:
    _, h, w = spec.in_shape
    k, s, p = layer.kernel_size[0], spec.conv["stride"], spec.conv["padding"]
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


# conv-ff state blocks: 96×15×15, 128×7×7, 256×3×3, 2048, 2048
CONV_FF_SIZES = (96 * 15 * 15, 128 * 7 * 7, 256 * 3 * 3, 2048, 2048)


def build_conv_ff(input_shape, num_classes: int) -> LinearReadoutModel:
    if tuple(input_shape) != (3, 32, 32):
        raise LcpError(f"conv-ff takes 3×32×32 images (CIFAR-10), got {tuple(input_shape)}")
    starts = [sum(CONV_FF_SIZES[:i]) for i in range(len(CONV_FF_SIZES) + 1)]
    state = starts[-1]
    # the paper's code creates the implicit blocks before the encoder
    layers = [
        nn.Conv2d(96, 128, kernel_size=5, stride=2, padding=1),
        nn.Conv2d(128, 256, kernel_size=5, stride=2, padding=1),
        nn.Linear(3 * 3 * 256, 2048),
        nn.Linear(2048, 2048),
    ]
    in_shapes = [(96, 15, 15), (128, 7, 7), (2304,), (2048,)]
    blocks = []
    for i, shape in enumerate(in_shapes):
        conv = {"stride": 2, "padding": 1} if i < 2 else None
        blocks.append(Block(starts[i], starts[i + 1], starts[i + 1], starts[i + 2], shape, conv))
    encoder = nn.Sequential(nn.Conv2d(3, 96, kernel_size=5, padding=2),
                            nn.MaxPool2d(kernel_size=3, stride=2))
    return LinearReadoutModel("conv-ff", state, blocks, layers, encoder, CONV_FF_SIZES[0],
                              starts[4], num_classes, "relu")


class ConvRNNModel(EquilibriumModel):
    """The paper's conv-rnn: f(h, v) = GN3(ReLU(h + GN2(v + conv2(GN1(ReLU(conv1(h))))))).

    As in the public code, the convolutions read the *input* h; the state enters only through
    GN2(v + ·), the ReLU and GN3. Its BatchNorms run in training mode (the paper never switches
    to eval mode), so their running statistics update on every call. Only rbp and lcp-di run on
    it; its vector-Jacobian products use autograd.
    """

    name = "conv-rnn"

    def __init__(self, input_shape, num_classes: int, channels: int = 48, inner: int = 64,
                 groups: int = 8):
        super().__init__()
        c_in, height, _ = input_shape
        self.encoder = nn.Sequential(nn.Conv2d(c_in, channels, kernel_size=3, padding=1),
                                     nn.BatchNorm2d(channels))
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        self.conv1.weight.data.normal_(0, 0.01)
        self.conv2.weight.data.normal_(0, 0.01)
        self.decoder_norm = nn.BatchNorm2d(channels)
        self.readout = nn.Linear(channels * (height // 8) ** 2, num_classes)

    def encode(self, x):
        return self.encoder(x)

    def decode_has_side_effects(self) -> bool:
        return self.decoder_norm.training and self.decoder_norm.track_running_stats

    def bind(self, h: torch.Tensor) -> "BoundImplicit":
        """The convolution path reads only h, so c = conv2(GN1(ReLU(conv1(h)))) is computed
        once per batch and every step evaluates f(h, v) = GN3(ReLU(h + GN2(v + c)))."""
        return _ConvRNNBound(self, h)

    def conv_path(self, h):  # c, the part of f that reads only h (see `bind`)
        return self.conv2(self.norm1(F.relu(self.conv1(h))))

    def implicit(self, h, v, c=None):
        c = self.conv_path(h) if c is None else c
        return self.norm3(F.relu(h + self.norm2(v + c)))

    def decode(self, v):
        return self.readout(F.avg_pool2d(self.decoder_norm(v), 8, 8).flatten(1))


class _ConvRNNBound(BoundImplicit):
    def __init__(self, model: ConvRNNModel, h: torch.Tensor):
        super().__init__(model, h)
        with torch.no_grad():
            self.c = model.conv_path(self.h)

    def __call__(self, v):
        return self.model.implicit(self.h, v, self.c)

    def transpose(self, v, e):
        return autograd_vjp(self, v, e)[1]

    def transpose_at(self, v):
        return autograd_transpose_at(self, v)


def build_model(cfg: RunConfig, input_shape, num_classes: int = 10) -> EquilibriumModel:
    """The model named by `cfg.model` (docs/equations.md, "Models"), with PyTorch's default
    initialisation."""
    if cfg.model in ("ff", "rnn"):
        hidden = cfg.rnn_hidden_units
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(int(math.prod(input_shape)), hidden))
        layer = nn.Linear(hidden, hidden)
        # ff: v = [a₁, a₂], the block writes a₂ = W₁ tanh(a₁) + b₁ and D reads a₂;
        # rnn: v = W₀x + b₀ + W₁ tanh(v) + b₁, the block reads and writes all of v
        out = hidden if cfg.model == "ff" else 0
        return LinearReadoutModel(
            cfg.model, out + hidden, [Block(0, hidden, out, out + hidden, (hidden,))], [layer],
            encoder, hidden, out, num_classes, "tanh")
    if cfg.model == "conv-ff":
        return build_conv_ff(input_shape, num_classes)
    if cfg.model == "conv-rnn":
        return ConvRNNModel(input_shape, num_classes)
    raise LcpError(f"unknown model {cfg.model!r}; valid: ff, rnn, conv-ff, conv-rnn")
