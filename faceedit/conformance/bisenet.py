"""Conformance of the BiSeNet face parser (fixture `bisenet_face_parser.json`).

Rebuild the state_dict by the fixture's fill rule, save it as `79999_iter.pth` is saved (a
plain state_dict), load it through `faceedit.loaders.bisenet.load_bisenet`, preprocess the
fixture's uint8 images with face-parsing's own transform and compare the parse logits and
labels. Labels may legitimately differ where the top-2 logits are within 1e-3
(`label_ambiguity`); any other mismatching pixel is a failure. The serving wrapper
`ParserExport` ([-1, 1] input, normalisation in the graph) is compared too.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from faceedit.conformance.common import OutputDiff, checksum_diffs, compare, filled_state_dict, fixture_images
from faceedit.loaders.bisenet import load_bisenet
from faceedit.nets.bisenet import BiSeNetConfig, ParserExport, preprocess_bisenet

log = logging.getLogger(__name__)


def label_mismatch_diff(name: str, labels: torch.Tensor, expected, ambiguous) -> OutputDiff:
    """Count of pixels whose label differs from `expected` outside the ambiguous ones (must be 0)."""
    expected = torch.as_tensor(expected, dtype=torch.int64)
    if tuple(labels.shape) != tuple(expected.shape):
        return OutputDiff(name, float("inf"), note=f"shape {list(labels.shape)} != expected {list(expected.shape)}")
    mismatch = labels.to(torch.int64) != expected
    allowed = torch.zeros_like(mismatch)
    for n, y, x in ambiguous:
        allowed[n, y, x] = True
    bad = int((mismatch & ~allowed).sum())
    return OutputDiff(name, float(bad), note=f"{int((mismatch & allowed).sum())} of {len(ambiguous)} near-tied "
                                             f"pixels differ (allowed); count of other mismatching pixels")


def check(fixture: dict, workdir: Path) -> list[OutputDiff]:
    cfg = fixture["config"]
    config = BiSeNetConfig(n_classes=cfg["n_classes"], class_names=tuple(fixture["class_names"]))
    path = workdir / "79999_iter.pth"
    torch.save(filled_state_dict(fixture), path)
    parser = load_bisenet(path, config)

    inputs = fixture["inputs"]
    image_u8 = fixture_images(inputs)
    size = cfg["input_size_fixture"][0]
    x = preprocess_bisenet(image_u8, size=size, config=config)
    diffs = checksum_diffs(x, inputs["x_checksums"])
    expected = fixture["expected"]
    ambiguous = fixture["label_ambiguity"]["pixels_n_y_x"]
    with torch.no_grad():
        logits = parser(x)[0]
        export_logits, export_labels = ParserExport(parser, input_size=size)(image_u8.to(torch.float32) / 127.5 - 1.0)
    diffs.append(compare("logits", logits, expected["logits"]))
    diffs.append(label_mismatch_diff("labels (mismatching pixels)", logits.argmax(dim=1), expected["labels"], ambiguous))
    diffs.append(compare("ParserExport logits ([-1,1] input)", export_logits, expected["logits"]))
    diffs.append(label_mismatch_diff("ParserExport labels (mismatching pixels)", export_labels, expected["labels"],
                                     ambiguous))
    return diffs
