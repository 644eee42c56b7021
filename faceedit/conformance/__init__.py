"""`faceedit conformance FIXTURE.json`: prove a published checkpoint format loads exactly.

A fixture (see tests/fixtures/conformance/README.md) pins a reference implementation with
deterministic fake weights. For each fixture we rebuild the state_dict by its fill rule,
write it in the *real* checkpoint layout, load that file through our own strict loader, run
the fixture's inputs and compare with `expected`. Exit 0 only if every output is within
TOLERANCE.

The fixture kind is recognised from its `source`; each kind has one module in this package
exposing `check(fixture, workdir) -> list[OutputDiff]`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import tempfile
from pathlib import Path

from faceedit.conformance.common import TOLERANCE, OutputDiff

log = logging.getLogger(__name__)

# substring of the fixture's `source` -> module in this package
KINDS = (
    ("stylegan2-ada-pytorch", "faceedit.conformance.stylegan2_ada"),
    ("rosinality/stylegan2-pytorch", "faceedit.conformance.stylegan2_rosinality"),
    ("encoder4editing", "faceedit.conformance.e4e"),
    ("face-parsing", "faceedit.conformance.bisenet"),
)


def fixture_kind(fixture: dict) -> str:
    source = str(fixture.get("source", ""))
    for needle, module in KINDS:
        if needle in source:
            return module
    raise ValueError(f"unknown fixture kind: source={source[:120]!r} matches none of {[n for n, _ in KINDS]}")


def check_fixture(path: str | Path) -> list[OutputDiff]:
    fixture = json.loads(Path(path).read_text())
    module = importlib.import_module(fixture_kind(fixture))
    with tempfile.TemporaryDirectory(prefix="faceedit-conformance-") as tmp:
        return module.check(fixture, Path(tmp))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixtures", nargs="+", type=Path, help="conformance fixture JSON file(s)")


def run(args: argparse.Namespace) -> int:
    ok = True
    for path in args.fixtures:
        try:
            diffs = check_fixture(path)
        except (ValueError, OSError, KeyError) as exc:
            print(f"{path}: ERROR {exc}")
            ok = False
            continue
        for d in diffs:
            print(f"{path.name}: {d.name:<40} max_abs_diff={d.max_abs_diff:.3e} {'ok' if d.passed else 'FAIL'}"
                  + (f"  ({d.note})" if d.note else ""))
        passed = bool(diffs) and all(d.passed for d in diffs)
        print(f"{path.name}: {'PASS' if passed else 'FAIL'} ({len(diffs)} outputs, tolerance {TOLERANCE:g})")
        ok = ok and passed
    return 0 if ok else 1
