"""`faceedit demo`: edit the bundled sample photos with the embedded default models (no Triton).

Starts the gateway in this process on a free loopback port with the default model set,
sends every sample photo through the public gRPC API (the same request pieces as the
`faceedit edit` client), writes the original and one edited photo per attribute into --out,
and stops the server. It also writes contact_sheet.png there: one row per photo, the
original then each edit, labelled (the README's before/after picture is this sheet).

    faceedit demo --out out/demo
    faceedit demo --photo me.jpg --edit smile=+0.8 --out out/demo
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import grpc

from faceedit.client import UsageError, output_options, parse_edit, timings_text
from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc
from services.gateway.config import DEFAULT_MODEL_SET, GatewayConfig
from services.gateway.serve import missing_model_set_message
from services.gateway.server import create_server

log = logging.getLogger(__name__)

# written by `python -m faceedit.world.make_samples --out faceedit/samples`: held-out
# synthetic people (no real person's photo ships with the project)
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# default strength: this fraction of each attribute's maximum, a clearly visible edit
DEFAULT_FRACTION = 0.75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the results")
    parser.add_argument("--model-set", type=Path, default=DEFAULT_MODEL_SET, help="model set (default: the bundle)")
    parser.add_argument("--photo", type=Path, action="append", default=[],
                        help=f"photo to edit; repeatable (default: the samples in {SAMPLES_DIR})")
    parser.add_argument("--edit", action="append", default=[], metavar="NAME=VALUE",
                        help="one edited photo per --edit (default: each attribute at "
                             f"{DEFAULT_FRACTION:g} of its maximum)")


def sample_photos() -> list[Path]:
    return sorted(p for p in SAMPLES_DIR.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES) if SAMPLES_DIR.is_dir() else []


async def edit_photos(model_set: Path, photos: list[Path], edits: list[pb.AttributeEdit], out: Path) -> int:
    """Edit every photo once per edit (default edits: every attribute with a direction)."""
    server, port = create_server("127.0.0.1:0", GatewayConfig(model_set=model_set))
    await server.start()
    failures = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FaceEditorStub(channel)
            editors = await stub.ListEditors(pb.ListEditorsRequest(), timeout=30)
            edits = edits or [
                pb.AttributeEdit(name=a.name, strength=round(DEFAULT_FRACTION * a.max, 3))
                for a in editors.attributes
                if any(d.kind == "interfacegan" and a.name in (d.attribute, d.name) for d in editors.directions)]
            if not edits:
                print("faceedit demo: the model set has no attribute directions to demonstrate", file=sys.stderr)
                return 1
            out.mkdir(parents=True, exist_ok=True)
            print(f"model set {editors.generator_id} ({editors.resolution} px); editing {len(photos)} photo(s)")
            rows: list[list[tuple[str, Path]]] = []
            for photo in photos:
                data = photo.read_bytes()
                original = out / f"{photo.stem}_original{photo.suffix.lower()}"
                original.write_bytes(data)
                rows.append([("original", original)])
                for edit in edits:
                    target = out / f"{photo.stem}_{edit.name}{edit.strength:+g}.png"
                    request = pb.EditRequest(image=data, edits=[edit], output=output_options(target, None, 0, False))
                    try:
                        response = await stub.Edit(request, timeout=300)
                    except grpc.aio.AioRpcError as err:
                        failures += 1
                        print(f"  {photo.name} {edit.name}{edit.strength:+g}: {err.code().name}: {err.details()}")
                        continue
                    target.write_bytes(response.image)
                    rows[-1].append((f"{edit.name}{edit.strength:+g}", target))
                    print(f"  wrote {target} ({response.width}x{response.height}); {timings_text(response.timings)}")
            sheet = out / "contact_sheet.png"
            contact_sheet(rows, sheet)
            print(f"  wrote {sheet}")
    finally:
        await server.stop(grace=1.0)
    return 1 if failures else 0


def contact_sheet(rows: list[list[tuple[str, Path]]], path: Path, height: int = 192, label: int = 14) -> None:
    """One row per photo: its (label, image file) cells scaled to `height` px, each under its
    label, cells as wide as the widest scaled image of the sheet."""
    from PIL import Image, ImageDraw

    def scaled(file: Path) -> Image.Image:
        with Image.open(file) as im:
            im = im.convert("RGB")
            return im.resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS)

    cells = [[(name, scaled(file)) for name, file in row] for row in rows]
    width = max((im.width for row in cells for _, im in row), default=height)
    columns = max((len(row) for row in cells), default=1)
    sheet = Image.new("RGB", (columns * width, len(cells) * (height + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(cells):
        for c, (name, im) in enumerate(row):
            x, y = c * width, r * (height + label)
            draw.text((x + 2, y + 1), name, fill=(0, 0, 0))
            sheet.paste(im, (x + (width - im.width) // 2, y + label))
    tmp = path.with_name(path.name + ".tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    try:
        edits = [parse_edit(t) for t in args.edit]
    except UsageError as exc:
        print(f"faceedit demo: {exc}", file=sys.stderr)
        return 2
    problem = missing_model_set_message(args.model_set)
    if problem:
        print(f"faceedit demo: {problem}", file=sys.stderr)
        return 2
    photos = args.photo or sample_photos()
    if not photos:
        print(f"faceedit demo: no sample photos in {SAMPLES_DIR}; make them with "
              f"`python -m faceedit.world.make_samples --out {SAMPLES_DIR}` or pass --photo", file=sys.stderr)
        return 2
    missing = [str(p) for p in photos if not p.is_file()]
    if missing:
        print(f"faceedit demo: no such photo {missing}", file=sys.stderr)
        return 2
    return asyncio.run(edit_photos(args.model_set, photos, edits, args.out))
