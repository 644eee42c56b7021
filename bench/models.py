"""Per-model benchmark cases: which network, at which size, with which inputs, and how many
FLOPs one image costs.

The real cases are the published architectures at their serving sizes, with SEEDED RANDOM
weights (no checkpoint is needed and none is downloaded): speed depends on the architecture,
the shapes and the FLOPs, not on the weight values.

| case            | network                                   | input              |
|-----------------|-------------------------------------------|--------------------|
| synthesis_1024  | StyleGAN2 config-f synthesis (rosinality) | W+ [N, 18, 512]    |
| synthesis_256   | StyleGAN2 config-f synthesis at 256 px    | W+ [N, 14, 512]    |
| encoder_256     | e4e (IR-SE50 + GradualStyleBlocks)        | image [N, 3, 256]  |
| parser_512      | BiSeNet (ResNet-18 context path), 19 cls  | image [N, 3, 512]  |

Each case builds the serving wrapper of ARCHITECTURE.md's contract (SynthesisExport,
EncoderExport, ParserExport) and takes its inputs from the exporter's ExportSpec, so the
benchmark runs exactly the graph that is exported and served.

FLOPs are counted, not estimated: `count_flops` runs the wrapper once on meta tensors (no
arithmetic, no memory) under a dispatch mode that sees every aten convolution and matrix
product with its real shapes. Dense convolutions, dense transposed ones (StyleGAN2's
upsampling convs), grouped/depthwise ones (the FIR blur and zero insertion of upfirdn2d) and
matrix products are kept apart: libraries run them at very different fractions of GEMM
speed. FLOPs = 2 x multiply-accumulates; element-wise work (modulation, noise, bias,
activations, BatchNorm) is not counted.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import faceedit
from exporters.specs import SPECS
from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig, ParserExport
from faceedit.nets.e4e import E4EConfig, Encoder4Editing, EncoderExport
from faceedit.nets.stylegan2 import Generator, ModulatedConv2d, StyleGAN2Config, SynthesisExport
from faceedit.onnx_export import MIN_OPSET, export_onnx

log = logging.getLogger(__name__)

# torch.export specialises batch sizes 0 and 1, so the export example batch must be >= 2
EXPORT_BATCH = 2
# sources whose change changes an exported graph (the ONNX cache is keyed by their digest)
_GRAPH_SOURCES = ("nets", "ops.py", "onnx_export.py")
# the exporter's libraries log every graph pass at INFO: thousands of lines for synthesis
_EXPORT_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


# ---------------------------------------------------------------------------------------
# FLOP counting


@dataclass(frozen=True)
class FlopCount:
    """Multiply-accumulates of one forward call, by kind."""
    dense_conv_macs: int = 0        # convolutions with groups == 1 (GEMM-shaped work)
    transposed_conv_macs: int = 0   # transposed convolutions with groups == 1 (GEMM + col2im in most libraries)
    grouped_conv_macs: int = 0      # grouped / depthwise convolutions (FIR blur, zero insertion)
    matmul_macs: int = 0            # mm / addmm / bmm (linear layers, demodulation, style affines)

    @property
    def macs(self) -> int:
        return self.dense_conv_macs + self.transposed_conv_macs + self.grouped_conv_macs + self.matmul_macs

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def gemm_share(self) -> float:
        """Fraction of the MACs that are GEMM-shaped (dense and transposed conv, matmul)."""
        return (self.macs - self.grouped_conv_macs) / self.macs if self.macs else 0.0

    def scaled(self, factor: int) -> "FlopCount":
        return FlopCount(self.dense_conv_macs * factor, self.transposed_conv_macs * factor,
                         self.grouped_conv_macs * factor, self.matmul_macs * factor)

    def to_dict(self) -> dict:
        return {"dense_conv_macs": self.dense_conv_macs, "transposed_conv_macs": self.transposed_conv_macs,
                "grouped_conv_macs": self.grouped_conv_macs, "matmul_macs": self.matmul_macs,
                "flops": self.flops, "gemm_share": self.gemm_share}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _MacCounter(TorchDispatchMode):
    """Counts MACs of aten convolutions and matrix products as they are dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = self.transposed = self.grouped = self.matmul = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        aten = torch.ops.aten
        if packet in (aten.convolution, aten._convolution):
            x, weight = args[0], args[1]
            transposed, groups = bool(args[6]), int(args[8])
            if transposed:
                # weight [C_in, C_out/g, k...]: every input pixel meets every weight once
                macs = x.shape[0] * _numel(x.shape[2:]) * _numel(weight.shape)
            else:
                # weight [C_out, C_in/g, k...]: every output pixel meets every weight once
                macs = out.shape[0] * _numel(out.shape[2:]) * _numel(weight.shape)
            if groups != 1:
                self.grouped += macs
            elif transposed:
                self.transposed += macs
            else:
                self.dense += macs
        elif packet in (aten.mm, aten.addmm):
            a, b = (args[0], args[1]) if packet is aten.mm else (args[1], args[2])
            self.matmul += a.shape[0] * a.shape[1] * b.shape[1]
        elif packet in (aten.bmm, aten.baddbmm):
            a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
            self.matmul += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return out


def count_flops(module: nn.Module, inputs: dict[str, torch.Tensor]) -> FlopCount:
    """MACs of `module(*inputs.values())`, counted on a meta-device copy (nothing computed)."""
    meta_module = copy.deepcopy(module).to("meta")
    meta_inputs = [t.to("meta") for t in inputs.values()]
    counter = _MacCounter()
    with torch.no_grad(), counter:
        meta_module(*meta_inputs)
    return FlopCount(counter.dense, counter.transposed, counter.grouped, counter.matmul)


# ---------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class BenchCase:
    name: str                  # also the Triton model name in the benchmark's repository
    served_as: str             # the serving-contract model (ExportSpec / SERVING row)
    description: str
    build: Callable[[int], nn.Module]  # seed -> serving wrapper in eval mode (random weights)

    @property
    def output_names(self) -> tuple[str, ...]:
        return SPECS[self.served_as].output_names

    @property
    def input_names(self) -> tuple[str, ...]:
        return SPECS[self.served_as].input_names

    def inputs(self, wrapper: nn.Module, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """Seeded inputs in the model's operating range (the exporter's own example inputs)."""
        return SPECS[self.served_as].example_inputs(wrapper, batch, seed)

    def flops_per_image(self, wrapper: nn.Module) -> FlopCount:
        return count_flops(wrapper, self.inputs(wrapper, 1, 0))


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    # seeded without touching the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def synthesis_case(name: str, config: StyleGAN2Config, description: str) -> BenchCase:
    return BenchCase(name, "synthesis", description,
                     lambda seed: _seeded(seed, lambda: SynthesisExport(Generator(config))))


def encoder_case(name: str, config: E4EConfig, input_size: int, description: str) -> BenchCase:
    def build(seed: int) -> nn.Module:
        return _seeded(seed, lambda: EncoderExport(Encoder4Editing(config), torch.zeros(config.style_dim), input_size))
    return BenchCase(name, "encoder", description, build)


def parser_case(name: str, config: BiSeNetConfig, input_size: int, description: str) -> BenchCase:
    return BenchCase(name, "parser", description,
                     lambda seed: _seeded(seed, lambda: ParserExport(BiSeNet(config), input_size)))


def real_cases() -> dict[str, BenchCase]:
    """The published architectures at their serving sizes (random weights)."""
    cases = (
        synthesis_case("synthesis_1024", StyleGAN2Config(size=1024, channel_multiplier=2),
                       "StyleGAN2 config-f synthesis, 1024 px (rosinality channels, multiplier 2)"),
        synthesis_case("synthesis_256", StyleGAN2Config(size=256, channel_multiplier=2),
                       "StyleGAN2 config-f synthesis, 256 px"),
        encoder_case("encoder_256", E4EConfig(), 256, "e4e IR-SE50 encoder, 256 px input, 18 styles"),
        parser_case("parser_512", BiSeNetConfig(), 512, "BiSeNet face parser (published widths), 512 px input"),
    )
    return {c.name: c for c in cases}


def tiny_cases() -> dict[str, BenchCase]:
    """The same architectures at toy sizes: for the smoke test and trying the tool out."""
    cases = (
        synthesis_case("synthesis_tiny", StyleGAN2Config(size=32, style_dim=32, n_mlp=2, channel_scheme="capped",
                                                         channel_base=256, channel_max=16),
                       "StyleGAN2 synthesis, 32 px, capped channels <= 16 (toy)"),
        encoder_case("encoder_tiny", E4EConfig(stylegan_size=32, style_dim=32, stage_channels=(16, 16, 32, 32)), 64,
                     "e4e IR-SE50 with narrow stages, 64 px input (toy)"),
        parser_case("parser_tiny", BiSeNetConfig(width_divisor=8), 64, "BiSeNet at 1/8 width, 64 px input (toy)"),
    )
    return {c.name: c for c in cases}


def all_cases() -> dict[str, BenchCase]:
    return {**real_cases(), **tiny_cases()}


# ---------------------------------------------------------------------------------------
# ONNX export (cached: config-f 1024 takes about a minute to export)


def graph_sources_digest() -> str:
    """Digest of the sources that define the exported graphs."""
    root = Path(faceedit.__file__).resolve().parent
    h = hashlib.sha256(torch.__version__.encode())
    for entry in _GRAPH_SOURCES:
        path = root / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def export_case(case: BenchCase, wrapper: nn.Module, out_dir: Path, seed: int, static_batch: int | None = None,
                variant: str = "") -> Path:
    """`<out_dir>/<case>[-variant][-b<batch>]-seed<seed>-<sources digest>.onnx`, exported
    unless already there.

    The export goes through the project's one export path (faceedit.onnx_export: dynamo,
    opset 18), so the benchmark measures the graph that is served: a dynamic batch axis,
    unless `static_batch` is given for a form that folds the batch into the channels (the
    grouped modulated conv), which can only be exported for one batch size.
    """
    tag = (f"-{variant}" if variant else "") + (f"-b{static_batch}" if static_batch else "")
    path = Path(out_dir) / f"{case.name}{tag}-seed{seed}-{graph_sources_digest()}.onnx"
    if path.is_file():
        log.info("%s: reusing exported %s", case.name, path)
        return path
    tmp = path.with_suffix(".partial.onnx")
    log.info("%s: exporting %s to ONNX (config-f 1024 takes about a minute)", case.name, path.name)
    with _quiet(_EXPORT_LOGGERS):
        export_onnx(wrapper, case.inputs(wrapper, static_batch or EXPORT_BATCH, seed), tmp, case.output_names,
                    dynamic_batch=static_batch is None, opset=MIN_OPSET)
    tmp.replace(path)  # only a finished export gets the cache name
    return path


def grouped_form(module: nn.Module) -> nn.Module | None:
    """A copy of `module` whose StyleGAN2 modulated convs run rosinality's fused grouped form
    (per-sample modulated weights, `ModulatedConv2d.forward_reference`) instead of the served
    activation-modulation form; None when it has no modulated conv. A per-instance forward
    override: the class and `module` itself stay as they are."""
    if not any(isinstance(m, ModulatedConv2d) for m in module.modules()):
        return None
    clone = copy.deepcopy(module)
    for conv in clone.modules():
        if isinstance(conv, ModulatedConv2d):
            conv.forward = conv.forward_reference
    return clone


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]):
    """Raise the named loggers to WARNING for the block, restoring their levels after."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
