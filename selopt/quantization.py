"""8-bit optimizer moments: blockwise absmax scales and dynamic (tree) code maps.

``moment_dtype="8bit"`` stores each moment of a large matrix as one ``uint8``
code per entry plus one fp32 scale per block of :func:`quant_block` entries:
about 2.03 bytes per parameter for both moments instead of 8. The format is
the one torchao's and bitsandbytes' ``AdamW8bit`` use, so quality compares:

- the scale of a block is its largest ``|x|`` (absmax);
- a code indexes a 256-entry *dynamic* code map of values in ``[-1, 1]``
  (``exp_avg``, signed) or ``[0, 1]`` (``exp_avg_sq``, unsigned): a decimal
  exponent and a linear fraction whose resolution grows as the exponent
  shrinks (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning");
- a value takes the code nearest to ``x / absmax`` (ties up), with one
  safety rule of selopt's: a positive ``exp_avg_sq`` never takes the zero
  code, so ``sqrt(v)`` in the denominator never drops to 0 under a non-zero
  ``m`` (rounding it up to the smallest positive code only shrinks a step).

Unlike the anchors, the blocks depend on the *whole* tensor, never on a
shard: a block is a run of the flattened tensor that never crosses a row
(dim 0), so FSDP2's ``Shard(0)`` never splits one, and a tensor has the same
state and the same results on any mesh. Tensors of fewer than
:data:`MIN_NUMEL` entries and 1-D tensors (norms, biases) keep fp32 moments,
as both anchors keep small tensors.

Every path reads a moment as stored: the step computes the new moments in
fp32 from the dequantized old ones, rounds them through the 8-bit format,
and both MoFO's selection and the update read those rounded values (as
bf16 moments are read), so that every pass of every path sees one value.

>>> codes, scales = quantize(torch.tensor([[1.0, -0.5, 0.01, 0.0]]), 4, signed=True)
>>> codes.dtype, scales.tolist(), dequantize(codes, scales, signed=True).tolist()
(torch.uint8, [[1.0]], [[1.0, -0.500781238079071, 0.009718749672174454, 0.0]])
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: Entries per scale at most: torchao's and bitsandbytes' block.
QUANT_BLOCK = 256
#: The fewest entries per scale: a row length with no power-of-two factor this large keeps fp32 moments.
MIN_QUANT_BLOCK = 32
#: Tensors with fewer entries keep fp32 moments (both anchors' threshold).
MIN_NUMEL = 4096
#: The option value that asks for 8-bit moments.
EIGHT_BIT = "8bit"
CODES = 256


def dynamic_code_map(signed: bool) -> Tensor:
    """The 256 values (fp32, ascending) an 8-bit code stands for, relative to its block's absmax.

    Seven decades ``10**-6 .. 10**0``; inside decade ``i`` (counted from the
    smallest) ``2**i`` evenly spaced values when signed (mirrored below zero),
    ``2**(i+1)`` when unsigned, plus 0 and 1.

    >>> signed, unsigned = dynamic_code_map(True), dynamic_code_map(False)
    >>> signed[0].item(), signed[-1].item(), unsigned[0].item(), len(unsigned)  # no -1: 0 takes its code
    (-0.992968738079071, 1.0, 0.0, 256)
    """
    decades = 7
    values = [0.0, 1.0]
    for i in range(decades):
        count = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        centres = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - decades + 1)).tolist()
        values += centres + ([-c for c in centres] if signed else [])
    values = sorted(values)
    if len(values) != CODES:
        raise AssertionError(f"a dynamic code map has {CODES} values, built {len(values)}")
    return torch.tensor(values, dtype=torch.float32)


@functools.cache
def code_map(signed: bool, device: torch.device = torch.device("cpu")) -> Tensor:
    """:func:`dynamic_code_map` on ``device``, made once."""
    return dynamic_code_map(signed).to(device)


@functools.cache
def decision_points(signed: bool, device: torch.device = torch.device("cpu")) -> Tensor:
    """The 255 midpoints between consecutive codes (fp32): a value's code is how many are ``<=`` it.

    Computed as ``lo + (hi - lo) * 0.5`` in fp32, the kernels' search compares with these same numbers.
    """
    values = dynamic_code_map(signed)
    return (values[:-1] + (values[1:] - values[:-1]) * 0.5).to(device)


def quant_block(shape: torch.Size | tuple[int, ...]) -> int | None:
    """Entries per scale for a tensor of (global) ``shape``, or None when it keeps fp32 moments.

    The largest power of two up to :data:`QUANT_BLOCK` that divides a row
    (``numel / shape[0]``), so blocks never cross rows; None for 1-D tensors,
    tensors under :data:`MIN_NUMEL` entries and rows with no power-of-two
    factor of :data:`MIN_QUANT_BLOCK` or more.

    >>> quant_block((4096, 11008)), quant_block((352, 128)), quant_block((128, 352)), quant_block((4096,))
    (256, 128, 32, None)
    """
    numel = 1
    for size in shape:
        numel *= size
    if len(shape) < 2 or numel < MIN_NUMEL:
        return None
    row = numel // shape[0]
    block = min(row & -row, QUANT_BLOCK)
    return block if block >= MIN_QUANT_BLOCK else None


def scales_shape(shape: torch.Size | tuple[int, ...], block: int) -> tuple[int, int]:
    """Shape of a tensor's scales: one row per row of the tensor (so they shard as it does), a scale per block.

    >>> scales_shape((6, 4, 64), 256)
    (6, 1)
    """
    rows = shape[0]
    numel = 1
    for size in shape:
        numel *= size
    return rows, (numel // rows // block if rows else 0)


def block_of(codes: Tensor, scales: Tensor) -> int:
    """Entries per scale of stored ``codes`` and their ``scales`` (also for a shard of each)."""
    return codes.numel() // scales.numel() if scales.numel() else QUANT_BLOCK


def quantize(x: Tensor, block: int, signed: bool) -> tuple[Tensor, Tensor]:
    """``x`` as codes (``uint8``, ``x``'s shape) and fp32 scales (:func:`scales_shape`).

    A block whose absmax is 0 gets scale 0 (its codes stand for 0); a block
    holding NaN gets a NaN scale, so all its entries read NaN (loud, as a NaN
    moment must be); ``x / absmax`` that is NaN (an infinite absmax) takes
    the code of 0.

    >>> codes, scales = quantize(torch.tensor([[3.0, 1.0e-9]]), 2, signed=False)
    >>> scales.tolist(), (codes > 0).tolist()  # the tiny positive value keeps a positive code
    ([[3.0]], [[True, True]])
    """
    values = x.detach().float()
    blocks = values.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    normalized = torch.where(absmax > 0, blocks / absmax, 0.0)
    normalized = torch.where(normalized == normalized, normalized, 0.0)
    codes = torch.searchsorted(decision_points(signed, x.device), normalized.contiguous(), right=True)
    if not signed:
        codes = torch.where(blocks > 0, codes.clamp(min=1), codes)
    return codes.to(torch.uint8).view(x.shape), absmax.view(scales_shape(x.shape, block))


def dequantize(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """The fp32 values that ``codes`` and their ``scales`` stand for (``code_map[code] * scale``)."""
    block = block_of(codes, scales)
    values = code_map(signed, codes.device)[codes.reshape(-1, block).long()] * scales.reshape(-1, 1)
    return values.view(codes.shape)
