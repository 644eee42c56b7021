"""One ExportSpec per served model: how to build its serving wrapper, its example inputs,
and its tensor names (ARCHITECTURE.md's serving contract, written down once here).

The wrappers themselves live next to their networks (faceedit/nets/*: MappingExport,
SynthesisExport, ..., ParserExport); a spec only knows which network a model is made from
and what realistic inputs look like, so the parity check exercises the range the model
really sees (images in [-1, 1], truncation in [0.5, 1], small style deltas).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from faceedit.nets.bisenet import BiSeNet, ParserExport
from faceedit.nets.classifier import AttributeClassifier, ClassifierExport
from faceedit.nets.content import ContentEncoder, ContentEncoderExport
from faceedit.nets.e4e import Encoder4Editing, EncoderExport
from faceedit.nets.mapper import LatentMapper, MapperExport
from faceedit.nets.stylegan2 import (Generator, MappingExport, SynthesisContentExport, SynthesisExport,
                                     SynthesisPreviewExport)

BATCH_AXIS = "N"


@dataclass(frozen=True, eq=False)  # holds modules/tensors: identity, not value, equality
class Networks:
    """The networks of one model set (None = that model is not in the set).

    Resolutions are the serving input sizes of the image models (the gateway resizes to
    them); the preview resolution is the synthesis block the preview stops at.
    """
    generator: Generator | None = None
    encoder: Encoder4Editing | None = None
    encoder_latent_avg: torch.Tensor | None = None   # [D] or [L, D], added by the wrapper
    encoder_resolution: int = 256
    parser: BiSeNet | None = None
    parser_resolution: int = 512
    classifier: AttributeClassifier | None = None
    mapper: LatentMapper | None = None
    content_encoder: ContentEncoder | None = None
    preview_resolution: int = 0                      # 0 = generator size / 4 (the contract)

    def preview_size(self) -> int:
        if self.generator is None:
            return 0
        return self.preview_resolution or self.generator.config.size // 4


def _image(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def _uniform(gen: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=gen)


def _wplus(wrapper: nn.Module, batch: int, gen: torch.Generator) -> torch.Tensor:
    """W+ codes with unit spread (the magnitude of mapped z; parity only needs realistic scale)."""
    cfg = wrapper.synthesis.config
    return torch.randn(batch, cfg.n_latent, cfg.style_dim, generator=gen)


# -- example inputs per model (wrapper, batch, generator) -> name -> tensor ---------------------

def _mapping_inputs(w: MappingExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d = w.mapping.config.style_dim
    return {"z": torch.randn(batch, d, generator=gen), "truncation": _uniform(gen, 0.5, 1.0, batch, 1)}


def _synthesis_inputs(w: SynthesisExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = w.synthesis.config.style_dim_total
    return {"wplus": _wplus(w, batch, gen), "style_delta": 0.1 * torch.randn(batch, s, generator=gen)}


def _synthesis_content_inputs(w: SynthesisContentExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = w.synthesis.config
    inputs = _synthesis_inputs(w, batch, gen)
    inputs["content"] = torch.randn(batch, cfg.content_channels, cfg.content_res, cfg.content_res, generator=gen)
    inputs["fusion_weight"] = _uniform(gen, 0.0, 1.0, batch, 1)
    return inputs


def _encoder_inputs(w: EncoderExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"image": _image(batch, w.input_size, gen)}


def _parser_inputs(w: ParserExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"image": _image(batch, w.input_size, gen)}


def _classifier_inputs(w: ClassifierExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"image": _image(batch, w.classifier.config.resolution, gen)}


def _content_encoder_inputs(w: ContentEncoderExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"image": _image(batch, w.encoder.config.resolution, gen)}


def _mapper_inputs(w: MapperExport, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    c = w.mapper.config
    return {"wplus": torch.randn(batch, c.n_latent, c.style_dim, generator=gen),
            "delta_attributes": _uniform(gen, -1.0, 1.0, batch, c.n_attributes)}


# -- wrappers per model: Networks -> wrapper, or None when the set lacks that network ------

def _mapping(n: Networks) -> nn.Module | None:
    return MappingExport(n.generator) if n.generator is not None else None


def _synthesis(n: Networks) -> nn.Module | None:
    return SynthesisExport(n.generator) if n.generator is not None else None


def _synthesis_content(n: Networks) -> nn.Module | None:
    if n.generator is None or not n.generator.config.content_res:
        return None
    return SynthesisContentExport(n.generator)


def _synthesis_preview(n: Networks) -> nn.Module | None:
    return SynthesisPreviewExport(n.generator, n.preview_size()) if n.generator is not None else None


def _encoder(n: Networks) -> nn.Module | None:
    if n.encoder is None:
        return None
    if n.encoder_latent_avg is None:
        raise ValueError("Networks.encoder_latent_avg: the encoder wrapper adds latent_avg; got None")
    return EncoderExport(n.encoder, n.encoder_latent_avg, n.encoder_resolution)


def _parser(n: Networks) -> nn.Module | None:
    return ParserExport(n.parser, n.parser_resolution) if n.parser is not None else None


def _classifier(n: Networks) -> nn.Module | None:
    return ClassifierExport(n.classifier) if n.classifier is not None else None


def _mapper(n: Networks) -> nn.Module | None:
    return MapperExport(n.mapper) if n.mapper is not None else None


def _content_encoder(n: Networks) -> nn.Module | None:
    return ContentEncoderExport(n.content_encoder) if n.content_encoder is not None else None


@dataclass(frozen=True)
class ExportSpec:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    build: Callable[[Networks], nn.Module | None]
    make_inputs: Callable[[nn.Module, int, torch.Generator], dict[str, torch.Tensor]]
    # (integer output, float output it is the argmax of): an argmax may legitimately flip
    # where two logits are within the parity tolerance, so parity checks it against them
    argmax_of: tuple[tuple[str, str], ...] = ()

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Every input and output has a dynamic batch axis 0 (Triton batches on it)."""
        return {name: {0: BATCH_AXIS} for name in self.input_names + self.output_names}

    def example_inputs(self, wrapper: nn.Module, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """Seeded inputs in the model's real operating range, in input_names order."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        inputs = self.make_inputs(wrapper, batch, torch.Generator().manual_seed(seed))
        return {name: inputs[name] for name in self.input_names}

    def wrapper(self, networks: Networks) -> nn.Module | None:
        """The serving wrapper in eval mode, its names checked against the contract."""
        module = self.build(networks)
        if module is None:
            return None
        # the nets declare their names as INPUT_NAMES (stylegan2) or input_names (ours)
        for attr, expected in (("INPUT_NAMES", self.input_names), ("input_names", self.input_names),
                               ("OUTPUT_NAMES", self.output_names), ("output_names", self.output_names)):
            declared = getattr(module, attr, None)
            if declared is not None and tuple(declared) != expected:
                raise ValueError(f"{type(module).__name__}.{attr} = {tuple(declared)} but the serving "
                                 f"contract for {self.name!r} is {expected}")
        return module.eval()


# The serving contract (ARCHITECTURE.md), in MODEL_NAMES order.
SPECS: dict[str, ExportSpec] = {s.name: s for s in (
    ExportSpec("mapping", ("z", "truncation"), ("w",), _mapping, _mapping_inputs),
    ExportSpec("synthesis", ("wplus", "style_delta"), ("image",), _synthesis, _synthesis_inputs),
    ExportSpec("synthesis_content", ("wplus", "style_delta", "content", "fusion_weight"), ("image",),
               _synthesis_content, _synthesis_content_inputs),
    ExportSpec("synthesis_preview", ("wplus", "style_delta"), ("image",), _synthesis_preview, _synthesis_inputs),
    ExportSpec("encoder", ("image",), ("wplus",), _encoder, _encoder_inputs),
    ExportSpec("content_encoder", ("image",), ("content",), _content_encoder, _content_encoder_inputs),
    ExportSpec("mapper", ("wplus", "delta_attributes"), ("wplus_edited",), _mapper, _mapper_inputs),
    ExportSpec("parser", ("image",), ("logits", "labels"), _parser, _parser_inputs,
               argmax_of=(("labels", "logits"),)),
    ExportSpec("classifier", ("image",), ("logits",), _classifier, _classifier_inputs),
)}
