"""Counter-based N(0, 1) numbers: lcp-lf's fast noise (`--lf_noise counter`, the default).

lcp-lf's noisy phase draws a fresh B × N normal vector at each of its ~800 steps. Drawn from
PyTorch's generator (`--lf_noise paper`, the same calls as the paper's code) the draw is the
largest part of the phase on CPU: the generator is sequential, so it runs on one core, and it is a
pass of its own over memory. Here the number at position `index` of step `step` is a pure
function of (key, step, index), so the compiled noisy pass (lcp/native) computes each number
where it uses it, on every thread, and any backend gives the same numbers:

    c = step · numel + index                              (numel: the size of one step's draw)
    z = mix64(key + (⌊c / 2⌋ + 1) · 0x9E3779B97F4A7C15)   (mod 2⁶⁴; SplitMix64's output function)
    u₁ = (⌊z / 2⁴⁰⌋ + 1) / 2²⁴ ∈ (0, 1],  u₂ = (⌊z / 2¹⁶⌋ mod 2²⁴) / 2²⁴ ∈ [0, 1)
    x = √(−2 ln u₁) · cos(2π u₂)          for even c     (Box–Muller's pair: r cos θ and
    x = √(−2 ln u₁) · cos(2π (u₂ + ¾))    for odd c       r sin θ = r cos(θ + 3π/2))

For a fixed key, z over ⌊c / 2⌋ = 0, 1, 2, … is exactly SplitMix64's stream seeded with `key` (a
generator that passes BigCrush), so every pair of positions gets its own 64-bit word; Box–Muller
turns its two independent uniforms into two independent exact N(0, 1) numbers (the 24-bit
uniforms bound |x| by √(48 ln 2) ≈ 5.8, a tail of probability 8·10⁻⁹, as PyTorch's float draws
are 24-bit too). The key is drawn once per noisy phase from PyTorch's generator
(`draw_key`), so a run stays reproducible from its seed.

This is the definition; `lcp/native/dynamics.cpp` computes the same numbers (float64: to
rounding; float32: with its own polynomial log and cosine, within a few ulp), and the load check
(`lcp.trainers.native_check`) compares the two.
"""

from __future__ import annotations

import math

import torch

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit word as the int64 PyTorch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (PyTorch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 words (products wrap mod 2⁶⁴)."""
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    return z ^ _shr(z, 31)


def draw_key(generator: torch.Generator | None = None) -> int:
    """A key for one noisy phase, drawn from PyTorch's (CPU) generator: 62 random bits."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator).item())


def counter_normal(key: int, step: int, shape, dtype=torch.float32,
                   device: torch.device | str | None = None, steps: int | None = None
                   ) -> torch.Tensor:
    """The N(0, 1) numbers of step `step` under `key`, of `shape` (row-major positions); with
    `steps`, those of steps step … step + steps − 1 at once, stacked (steps, *shape): one set
    of kernels for several steps, where each kernel launch costs (CUDA)."""
    numel = math.prod(shape)
    count = 1 if steps is None else steps
    counter = torch.arange(count * numel, dtype=torch.int64, device=device) + step * numel
    z = mix64(_signed(key) + ((counter >> 1) + 1) * _signed(GAMMA))
    u1 = (_shr(z, 40) + 1).to(torch.float64) * 2.0**-24
    u2 = (_shr(z, 16) & 0xFFFFFF).to(torch.float64) * 2.0**-24
    odd = (counter & 1).bool()
    u2 = torch.where(odd, torch.where(u2 >= 0.25, u2 - 0.25, u2 + 0.75), u2)  # exact
    x = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return x.to(dtype).view(*shape) if steps is None else x.to(dtype).view(count, *shape)
