"""Gradients that stress the selection rule, shared by the tests of every implementation."""

import torch


def ties(shape, gen):
    # Few distinct magnitudes: many entries tie at every block's threshold.
    return torch.randint(-2, 3, shape, generator=gen).float()


def with_nans(shape, gen):
    g = torch.randn(shape, generator=gen)
    return g.masked_fill(torch.rand(shape, generator=gen) < 0.2, float("nan"))


def mostly_zero(shape, gen):
    # Fewer non-zero gradients than k: the zero-momentum rest must not be selected.
    g = torch.randn(shape, generator=gen)
    return g.masked_fill(torch.rand(shape, generator=gen) < 0.9, 0.0)
