"""Equilibrium models: an encoder E, an implicit map f(h, v) and a decoder D(v).

A model computes `h = E(x)`, has a state `v` with the fixed point `v = f(h, v)`, and outputs
`D(v)`. Trainers only use the methods of `EquilibriumModel`:

- `encode(x)`, `implicit(h, v)`, `decode(v)`;
- `implicit_vjp(h, v, e) -> (f(h, v), (∂f/∂v)ᵀ e)` and `decode_vjp(v, u) -> (D(v), (∂D/∂v)ᵀ u)`,
  the vector–Jacobian products the controller dynamics need at every step. The base class
  computes them with autograd; `LinearReadoutModel` (ff, rnn, conv-ff) has them in closed form,
  which keeps autograd out of the controller loop.

Modules are created in the same order as in the paper's code so that, under the same seed, the
initial weights are the same.
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

    def implicit_vjp(self, h, v, e):
        """(f(h, v), (∂f/∂v)ᵀ e), without building a graph into the parameters' grads."""
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            out = self.implicit(h.detach(), v)
            (vjp,) = torch.autograd.grad(out, v, e)
        return out.detach(), vjp

    def decode_vjp(self, v, u):
        """(D(v), (∂D/∂v)ᵀ u)."""
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            out = self.decode(v)
            (vjp,) = torch.autograd.grad(out, v, u)
        return out.detach(), vjp

    def implicit_transpose(self, h, v, e):
        """(∂f/∂v)ᵀ e alone."""
        return self.implicit_vjp(h, v, e)[1]

    def decode_has_side_effects(self) -> bool:
        """Whether calling D changes the model (a BatchNorm in training mode updates its
        running statistics): a solver must then not evaluate extra steps."""
        return False

    def bind(self, h: torch.Tensor) -> "BoundImplicit":
        """f(h, ·) for the no-grad dynamics of one batch, with whatever depends on h alone
        computed once (see `ConvRNNModel`)."""
        return BoundImplicit(self, h)


class BoundImplicit:
    """f(h, ·) for one batch: `f(v)`, `f.vjp(v, e)`, `f.transpose(v, e)`."""

    def __init__(self, model: EquilibriumModel, h: torch.Tensor):
        self.model, self.h = model, h.detach()

    def __call__(self, v):
        return self.model.implicit(self.h, v)

    def vjp(self, v, e):
        return self.model.implicit_vjp(self.h, v, e)

    def transpose(self, v, e):
        return self.model.implicit_transpose(self.h, v, e)

    def decode_transpose(self, v, u):
        """(∂D/∂v)ᵀ u alone."""
        return self.decode_vjp(v, u)[1]

    # parameter groups the trainers treat differently (KP decays f and D, not E)
    def encoder_parameters(self):
        raise NotImplementedError

    def implicit_parameters(self):
        raise NotImplementedError

    def decoder_parameters(self):
        raise NotImplementedError


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
        hidden = self.act(v)
        pieces = []
        cursor = 0
        for spec, y in self._block_outputs(hidden):
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
        vjp = torch.zeros_like(v)
        for spec, layer in zip(self.block_specs, self.blocks):
            back = self._layer_transpose(spec, layer, e[:, spec.out_start:spec.out_end])
            vjp[:, spec.in_start:spec.in_end] += back
        return vjp * self.act_grad(v)

    def implicit_vjp(self, h, v, e):
        return self.implicit(h, v), self.implicit_transpose(h, v, e)

    def decode_transpose(self, v, u):
        tail = v[:, self.readout_start:]
        return F.pad((u @ self.readout.weight) * self.act_grad(tail), (self.readout_start, 0))

    def decode_vjp(self, v, u):
        return self.decode(v), self.decode_transpose(v, u)

    def encoder_parameters(self):
        return list(self.encoder.parameters())

    def implicit_parameters(self):
        return list(self.blocks.parameters())

    # -- fused kernels for the no-grad dynamics
    def dynamics_plan(self, h: torch.Tensor) -> "DynamicsPlan":
        """Per-batch constants and fused kernels for dynamics that run with the current weights
        (one solve); see `DynamicsPlan`."""
        return DynamicsPlan(self, h)

    def decoder_parameters(self):
        return list(self.readout.parameters())


class DynamicsPlan:
    """The pieces of f and D that the no-grad dynamics of a `LinearReadoutModel` need at every
    step, prepared once per batch, and kernels that write into the caller's buffers.

    With t = φ(v) (batch-first, like the model's tensors):

        f(h, v) = h_b + Σ_blocks pad(t_in Wᵀ),   h_b = h + Σ_blocks pad(b) (once per batch)
        D(v)    = t_readout W_Dᵀ + b_D

    Kernels read φ(v) from the plan's buffer `t`, filled by `act(v)`. The transposed products
    write into a scratch buffer laid out once: columns no product writes stay zero, and a
    region written by one product (ff, conv-ff) or by identical ones (rnn) needs no zeroing
    per step. Views of buffers used at every step can be computed once (`out_views`). Nothing
    here builds an autograd graph; a plan is valid while the weights do not change (one solve).
    """

    def __init__(self, model: "LinearReadoutModel", h: torch.Tensor):
        with torch.no_grad():
            h = h.detach()
            self.batch, self.size = h.shape
            self.tanh = model.activation == "tanh"
            self.r0 = model.readout_start
            self.W_D = model.readout.weight.detach()  # C × H_r
            self.W_D_t = self.W_D.t()
            self.b_D = model.readout.bias.detach()
            self.blocks = []
            h_b = h.clone()
            for spec, layer in zip(model.block_specs, model.blocks):
                weight = layer.weight.detach()
                conv = None
                if spec.conv is not None:
                    out_hw = _conv_out_hw(spec, layer)
                    conv = (spec.in_shape, (layer.out_channels, *out_hw), spec.conv["stride"],
                            spec.conv["padding"])
                if layer.bias is not None:
                    bias = layer.bias.detach()
                    if conv is not None:
                        bias = bias[:, None].expand(-1, out_hw[0] * out_hw[1]).reshape(-1)
                    h_b[:, spec.out_start:spec.out_end] += bias
                # Wᵀ as a contiguous copy (once per batch): a product with a transposed view
                # costs ~20% more at every step of a solve
                self.blocks.append((spec, weight,
                                    weight.t().contiguous() if conv is None else None, conv))
            self.h_b = h_b
            self.t = torch.empty_like(h_b)  # φ(v) of the current step
            self._t_in = [self.t[:, spec.in_start:spec.in_end] for spec, *_ in self.blocks]
            self._t_r = self.t[:, self.r0:]
            self._scratch: dict = {}
            self._soft_in = None
            self._forward = None

    def forward_products(self):
        """(p_v, products): a B × N buffer and the blocks' forward products t_in Wᵀ of the
        plan's t = φ(v) into their output columns of it (columns no block writes stay zero), as
        `run_products` takes them, for the compiled passes of `lcp.native`. Made once per plan."""
        if self._forward is None:
            p_v = torch.zeros_like(self.h_b)
            seen, products = set(), []
            for (spec, _w, weight_t, _conv), piece in zip(self.blocks, self._t_in):
                region = (spec.out_start, spec.out_end)
                products.append((piece, weight_t, p_v[:, region[0]:region[1]],
                                 region not in seen))
                seen.add(region)
            self._forward = (p_v, products)
        return self._forward

    def native_kernels(self):
        """The compiled kernels (`lcp.native`) where they apply to this plan — CPU, float32 or
        float64, tanh, linear blocks — else None."""
        if not (self.tanh and self.h_b.device.type == "cpu"
                and self.h_b.dtype in (torch.float32, torch.float64)
                and all(conv is None for *_, conv in self.blocks)):
            return None
        from lcp import native

        return native.library()

    def free_stepper(self):
        """The free dynamics v ← f(h, v) as a solver step from the zero state: (step, start).

        On CPU with the compiled kernels (`lcp.native`; linear blocks, tanh) the step is tanh,
        the blocks' products and one compiled pass that also measures the solver's stopping
        error (`lcp.solvers.MeasuredStep`); its states live in two buffers it alternates
        between. Otherwise each step writes a new tensor with the plan's PyTorch kernels."""
        start = self.h_b.new_zeros(self.batch, self.size)
        lib = self.native_kernels()
        if lib is not None:
            return _NativeFree(self, lib, start).stepper(), start

        def step(v):
            self.act(v)
            return (self.implicit_into(torch.empty_like(v)),)

        return step, start

    def out_views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The views of `x` (state-sized) that the blocks write in the forward direction and
        read in the transposed one; precompute them for buffers used at every step."""
        return [x[:, spec.out_start:spec.out_end] for spec, *_ in self.blocks]

    # ---------------------------------------------------------------- pieces of one step
    def softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits, dim=1) for a B × C tensor (a view is fine), computed on a C × B copy:
        on CPU the softmax over a short last dimension costs several times more. Returns a
        B × C view of the plan's buffer (valid until the next call)."""
        buf = self._soft_in
        if buf is None or buf.shape != (logits.shape[1], logits.shape[0]):
            buf = self._soft_in = logits.new_empty(logits.shape[1], logits.shape[0])
        return torch.softmax(buf.copy_(logits.t()), dim=0).t()

    def act(self, v: torch.Tensor) -> torch.Tensor:
        """t = φ(v), into the plan's buffer `t`, which the kernels below read (valid until the
        next call)."""
        if self.tanh:
            return torch.tanh(v, out=self.t)
        return torch.clamp(v, min=0, out=self.t)

    def act_grad_mul_into(self, out, s, v):
        """out = φ'(v) ⊙ s (after `act(v)`; `out` may be `s`)."""
        if self.tanh:
            return torch.ops.aten.tanh_backward.grad_input(s, self.t, grad_input=out)
        return torch.ops.aten.threshold_backward.grad_input(s, v, 0, grad_input=out)

    def act_grad(self, v):
        """φ'(v) as a new tensor (after `act(v)`)."""
        if self.tanh:
            return torch.ops.aten.tanh_backward(torch.ones_like(self.t), self.t)
        return (v > 0).to(v.dtype)

    def blocks_add_(self, out: torch.Tensor, alpha: float = 1.0, views=None):
        """out += alpha · Σ_blocks pad(t_in Wᵀ) (biases excluded: they are in h_b)."""
        if views is None:
            views = self.out_views(out)
        for (spec, weight, weight_t, conv), piece, target in zip(self.blocks, self._t_in,
                                                                 views):
            if conv is None:
                target.addmm_(piece, weight_t, alpha=alpha)
            else:
                in_shape, _, stride, padding = conv
                y = F.conv2d(piece.reshape(-1, *in_shape), weight, None, stride, padding)
                target.add_(y.flatten(1), alpha=alpha)
        return out

    def implicit_into(self, out, add=None, views=None):
        """out = f(h, v) (+ add), after `act(v)`."""
        if add is None:
            out.copy_(self.h_b)
        else:
            torch.add(self.h_b, add, out=out)
        return self.blocks_add_(out, views=views)

    def decode_into(self, out, add=None):
        """out = D(v) (+ add), after `act(v)`."""
        if add is None:
            out.copy_(self.b_D.expand_as(out))
        else:
            torch.add(add, self.b_D, out=out)
        return out.addmm_(self._t_r, self.W_D_t)

    def _scratch_for(self, with_u: bool):
        """The scratch buffer of `transpose_sum` (with or without the readout term), the view
        each product writes and whether it overwrites (first writer of its region) or adds."""
        if with_u not in self._scratch:
            # block b writes its input slice, the readout its own slice
            regions = [(s.in_start, s.in_end) for s, *_ in self.blocks]
            if with_u:
                regions.append((self.r0, self.size))
            unique = sorted(set(regions))
            overlapping = any(a[1] > b[0] for a, b in zip(unique, unique[1:]))
            covered = torch.zeros(self.size, dtype=torch.bool)
            for a, b in regions:
                covered[a:b] = True
            buf = (torch.zeros_like(self.h_b) if overlapping or not bool(covered.all())
                   else torch.empty_like(self.h_b))
            seen, writes = set(), []
            for a, b in regions:
                writes.append((buf[:, a:b], not overlapping and (a, b) not in seen))
                seen.add((a, b))
            self._scratch[with_u] = (buf, overlapping, writes)
        return self._scratch[with_u]

    def transpose_sum(self, e, u, feedback=None, views=None) -> torch.Tensor:
        """Σ_blocks scatter(e_out W) + pad(u W_D) (u may be None), in the plan's scratch
        buffer (overwritten by the next call). With `feedback` (lcp-kp's FeedbackWeights) its
        maps replace the transposes: B(e) + P(D_t u)."""
        s, overlapping, writes = self._scratch_for(u is not None)
        if overlapping:
            s.zero_()
        if views is None:
            views = self.out_views(e)
        for i, ((spec, weight, _, conv), piece) in enumerate(zip(self.blocks, views)):
            target, first = writes[i]
            if conv is None:
                m = weight if feedback is None else feedback.maps[i].weight.t()
                if first:
                    torch.mm(piece, m, out=target)
                else:
                    target.addmm_(piece, m)
            else:
                in_shape, out_shape, stride, padding = conv
                grad_out = piece.reshape(-1, *out_shape)
                if feedback is None:
                    back = torch.nn.grad.conv2d_input((grad_out.shape[0], *in_shape), weight,
                                                      grad_out, stride=stride, padding=padding)
                else:
                    back = F.conv_transpose2d(grad_out, feedback.maps[i].weight, None, stride,
                                              padding)
                if first:
                    target.copy_(back.flatten(1))
                else:
                    target.add_(back.flatten(1))
        if u is not None:
            target, first = writes[-1]
            m = self.W_D if feedback is None else feedback.D_t.t()
            if first:
                torch.mm(u, m, out=target)
            else:
                target.addmm_(u, m)
        return s

    def transpose_into(self, out, v, e, u, feedback=None, views=None):
        """out = (∂f/∂v)ᵀe + (∂D/∂v)ᵀu = φ'(v) ⊙ (Σ e_out W + u W_D), after `act(v)`."""
        return self.act_grad_mul_into(out, self.transpose_sum(e, u, feedback, views), v)


def run_products(products) -> None:
    """For each (a, b, out, overwrite): out = a b (overwrite) or out += a b."""
    for a, b, out, overwrite in products:
        if overwrite:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)


class _NativeFree:
    """`DynamicsPlan.free_stepper`'s compiled step: v' = h_b + Σ_blocks pad(tanh(v)_in Wᵀ)."""

    def __init__(self, plan: DynamicsPlan, lib, start: torch.Tensor):
        from lcp import native

        self.plan = plan
        self.buffers = [start, torch.empty_like(start)]
        self.index = {b.data_ptr(): i for i, b in enumerate(self.buffers)}
        self.p_v, self.products = plan.forward_products()
        self.h_b = plan.h_b.contiguous()
        self.per_sample = start.new_zeros(plan.batch)
        self.fn = lib.get("free_step", start.dtype)
        self.args = (self.h_b.data_ptr(), self.p_v.data_ptr(), self.per_sample.data_ptr(),
                     native.threads_for(plan.batch, plan.size))

    def measure(self, v: torch.Tensor):
        i = self.index.get(v.data_ptr())
        if i is None or not v.is_contiguous():  # not one of ours (another solver's iterate)
            src = self.buffers[0].copy_(v)
            i = 0
        else:
            src = v
        dst = self.buffers[1 - i]
        torch.tanh(src, out=self.plan.t)
        run_products(self.products)
        error = self.fn(self.plan.batch, self.plan.size, src.data_ptr(), dst.data_ptr(),
                        *self.args)
        return dst, self.per_sample, error

    def step(self, v: torch.Tensor):
        return (self.measure(v)[0],)

    def stepper(self):
        from lcp.solvers import MeasuredStep

        return MeasuredStep(self.step, self.measure)


def _conv_out_hw(spec: Block, layer: nn.Conv2d) -> tuple[int, int]:
    _, h, w = spec.in_shape
    k, s, p = layer.kernel_size[0], spec.conv["stride"], spec.conv["padding"]
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def build_ff(input_shape, hidden: int, num_classes: int) -> LinearReadoutModel:
    """[a1, a2]: a1 = W0 x + b0 (from h), a2 = W1 tanh(a1) + b1; D = W2 tanh(a2) + b2."""
    n_in = int(math.prod(input_shape))
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden))
    layer = nn.Linear(hidden, hidden)
    model = LinearReadoutModel(
        "ff", 2 * hidden, [Block(0, hidden, hidden, 2 * hidden, (hidden,))], [layer],
        encoder, hidden, hidden, num_classes, "tanh")
    return model


def build_rnn(input_shape, hidden: int, num_classes: int) -> LinearReadoutModel:
    """v = W0 x + b0 + W1 tanh(v) + b1; D = W2 tanh(v) + b2."""
    n_in = int(math.prod(input_shape))
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden))
    layer = nn.Linear(hidden, hidden)
    return LinearReadoutModel(
        "rnn", hidden, [Block(0, hidden, 0, hidden, (hidden,))], [layer],
        encoder, hidden, 0, num_classes, "tanh")


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

    def implicit(self, h, v):
        y = self.norm1(F.relu(self.conv1(h)))
        return self.norm3(F.relu(h + self.norm2(v + self.conv2(y))))

    def decode(self, v):
        return self.readout(F.avg_pool2d(self.decoder_norm(v), 8, 8).flatten(1))

    def encoder_parameters(self):
        return list(self.encoder.parameters())

    def implicit_parameters(self):
        mods = [self.conv1, self.conv2, self.norm1, self.norm2, self.norm3]
        return [p for m in mods for p in m.parameters()]

    def decoder_parameters(self):
        return list(self.decoder_norm.parameters()) + list(self.readout.parameters())


class _ConvRNNBound(BoundImplicit):
    def __init__(self, model: ConvRNNModel, h: torch.Tensor):
        super().__init__(model, h)
        with torch.no_grad():
            self.c = model.conv2(model.norm1(F.relu(model.conv1(self.h))))

    def __call__(self, v):
        m = self.model
        return m.norm3(F.relu(self.h + m.norm2(v + self.c)))

    def vjp(self, v, e):
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            out = self(v)
            (vjp,) = torch.autograd.grad(out, v, e)
        return out.detach(), vjp

    def transpose(self, v, e):
        return self.vjp(v, e)[1]


def build_model(cfg: RunConfig, input_shape, num_classes: int = 10) -> EquilibriumModel:
    """The model of SPEC §1 named by `cfg.model`, with PyTorch's default initialisation."""
    if cfg.model == "ff":
        return build_ff(input_shape, cfg.rnn_hidden_units, num_classes)
    if cfg.model == "rnn":
        return build_rnn(input_shape, cfg.rnn_hidden_units, num_classes)
    if cfg.model == "conv-ff":
        return build_conv_ff(input_shape, num_classes)
    if cfg.model == "conv-rnn":
        return ConvRNNModel(input_shape, num_classes)
    raise LcpError(f"unknown model {cfg.model!r}; valid: ff, rnn, conv-ff, conv-rnn")
