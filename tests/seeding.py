"""Seeded weights for tests of networks with published layouts (BiSeNet, e4e): every tensor
from one generator, so a golden slice pins the architecture and the fill together."""
from __future__ import annotations

from typing import Callable

import torch


def seeded_(module: torch.nn.Module, seed: int, conv_gain: float,
            other: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """Fill `module` in place and return it in eval mode: convolutions ~ N(0, conv_gain / fan_in),
    BatchNorm running_var away from identity (|r| / 2 + 1/2), every other tensor `other(name,
    tensor, r)` of its standard-normal draw r (the nets differ there)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(r.abs() * 0.5 + 0.5)
            elif t.ndim == 4:
                t.copy_(r * (conv_gain / t[0].numel()) ** 0.5)
            else:
                t.copy_(other(name, t, r))
    return module.eval()
