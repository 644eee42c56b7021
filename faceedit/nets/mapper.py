"""Latent-to-Latent mapper (ours, after Khodadadeh et al., "Latent to Latent: A Learned Mapper
for Identity Preserving Editing of Multiple Face Attributes in StyleGAN-generated Images",
WACV 2022).

f(w, delta_a) -> w': an MLP on concat(w, delta_a) whose hidden layers are as wide as that
input, with tanh activations; delta_a [N, A] is the requested change of every attribute at once
(zeros = keep), so several attributes are edited jointly and the network can learn the
non-linear, entangled paths that fixed linear directions miss.

Latent space (`MapperConfig.space`):
* "wplus": the paper edits e4e inversions of real faces in W+ and feeds the whole code
  flattened ([N, L*D]) together with delta_a. We follow it: one MLP over the flattened code
  can move coarse and fine layers differently (pose lives in early layers, colour in late
  ones), which a per-layer shared MLP cannot, because it never sees which layer it is on.
  The price is size: the hidden width is L*D + A (9216 + A at 1024px).
* "w": the mapper works on one w [N, D]. Served on W+ input, it is applied to every layer's
  row with the same weights (for a W code all rows are equal, so this is exactly f(w)).

The module returns w' itself; internally it predicts the residual w' - w and its output layer
starts at zero, so an untrained mapper is the identity (f(w, 0) = w holds from step 0 and
the attribute loss alone drives the first updates).

Training (the trainer lives elsewhere; these are the paper's losses, weights are ours to tune):
* attribute loss: an attribute regressor C (on latents or, through G, on images) must see
  the requested change: || C(f(w, da)) - (C(w) + da) ||^2, over *all* attributes, so the
  ones with da_i = 0 are held fixed (this is what makes edits disentangled).
* cycle loss: undoing an edit returns the code: || f(f(w, da), -da) - w ||^2.
* identity loss: no change requested -> no change: || f(w, 0) - w ||^2.
* neighbourhood loss: stay close to the input (and so to the well-behaved region of W+
  the generator knows): || f(w, da) - w ||^2.
* face-identity loss: the person must remain recognisable: 1 - cos(R(G(w)), R(G(f(w, da))))
  with R a face-recognition embedding and G the frozen generator.
Sample da per attribute in the attribute's calibrated range, clipped so C(w) + da stays
inside the attribute's valid range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from faceedit.shapes import assert_shape

SPACES = ("w", "wplus")


@dataclass(frozen=True)
class MapperConfig:
    n_latent: int                   # L, W+ layers of the generator
    style_dim: int                  # D
    attributes: tuple[str, ...]     # the order of delta_attributes (A = len)
    n_layers: int = 4               # fully-connected layers in total (the last one projects to the latent)
    space: str = "wplus"            # "w" or "wplus" (see module docstring)

    def __post_init__(self) -> None:
        if self.n_latent < 1:
            raise ValueError(f"MapperConfig.n_latent: must be >= 1, got {self.n_latent}")
        if self.style_dim < 1:
            raise ValueError(f"MapperConfig.style_dim: must be >= 1, got {self.style_dim}")
        if len(self.attributes) == 0:
            raise ValueError("MapperConfig.attributes: needs at least one attribute name, got none")
        if any(not isinstance(a, str) or not a for a in self.attributes):
            raise ValueError(f"MapperConfig.attributes: every name must be a non-empty string, got {list(self.attributes)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"MapperConfig.attributes: names must be unique, got {list(self.attributes)}")
        if self.n_layers < 2:
            raise ValueError(f"MapperConfig.n_layers: must be >= 2 (at least one tanh hidden layer), got {self.n_layers}")
        if self.space not in SPACES:
            raise ValueError(f"MapperConfig.space: must be one of {SPACES}, got {self.space!r}")

    @property
    def n_attributes(self) -> int:
        return len(self.attributes)

    @property
    def latent_size(self) -> int:
        """Width of the code the MLP sees: D for "w", L*D for "wplus"."""
        return self.style_dim if self.space == "w" else self.n_latent * self.style_dim

    @property
    def hidden_width(self) -> int:
        return self.latent_size + self.n_attributes


class LatentMapper(nn.Module):
    """forward(w, delta_attributes): w [N, D] ("w") or [N, L, D] ("wplus"); delta [N, A]."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        width = config.hidden_width
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(config.n_layers - 1))
        self.out = nn.Linear(width, config.latent_size)
        # zero residual at init: the identity f(w, 0) = w before any training
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _latent_shape(self) -> list[int | None]:
        c = self.config
        return [None, c.style_dim] if c.space == "w" else [None, c.n_latent, c.style_dim]

    def forward(self, w: torch.Tensor, delta_attributes: torch.Tensor) -> torch.Tensor:
        c = self.config
        assert_shape(w, self._latent_shape(), "w")
        assert_shape(delta_attributes, [None, c.n_attributes], "delta_attributes")
        flat = w.reshape(w.shape[0], c.latent_size)
        h = torch.cat([flat, delta_attributes.to(flat.dtype)], dim=1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        edited = (flat + self.out(h)).reshape(w.shape)
        assert_shape(edited, self._latent_shape(), "w_edited")
        return edited


class MapperExport(nn.Module):
    """Serving form (model `mapper`): inputs `wplus` [N, L, D], `delta_attributes` [N, A] ->
    output `wplus_edited` [N, L, D], whatever the mapper's space."""

    input_names = ("wplus", "delta_attributes")
    output_names = ("wplus_edited",)

    def __init__(self, mapper: LatentMapper):
        super().__init__()
        self.mapper = mapper

    def forward(self, wplus: torch.Tensor, delta_attributes: torch.Tensor) -> torch.Tensor:
        c = self.mapper.config
        assert_shape(wplus, [None, c.n_latent, c.style_dim], "wplus")
        assert_shape(delta_attributes, [None, c.n_attributes], "delta_attributes")
        if c.space == "wplus":
            return self.mapper(wplus, delta_attributes)
        # "w": every layer row through the same MLP, each with its sample's delta
        rows = wplus.reshape(-1, c.style_dim)
        deltas = delta_attributes[:, None, :].expand(-1, c.n_latent, -1).reshape(-1, c.n_attributes)
        return self.mapper(rows, deltas).reshape(wplus.shape)
