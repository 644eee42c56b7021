"""Write held-out sample photos of the synthetic face world, and check them against dlib.

    python -m faceedit.world.make_samples --out faceedit/samples
    python -m faceedit.world.make_samples --dlib-check 100     # detection rate + landmark error
    OMP_NUM_THREADS=1 python -m faceedit.world.make_samples --benchmark 512   # faces/s at 128

Samples use seeds >= HELD_OUT_SEED_START, which training never renders. samples.json lists,
per PNG, its seed, identity, attributes, ground-truth landmarks (in that PNG's pixels) and,
for scenes, the face-to-scene matrix.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from faceedit.world.attributes import HELD_OUT_SEED_START, LANDMARK_GROUPS, records_to_jsonable
from faceedit.world.render import apply_matrix, benchmark, paste_into_scene, render_batch

log = logging.getLogger(__name__)

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
MAX_SKIPPED = 20


@dataclass(frozen=True)
class SampleSpec:
    faces: int = 2             # 256 x 256 aligned faces
    scenes: int = 2            # faces pasted into rooms
    face_size: int = 256
    scene_face_size: int = 256
    scene_hw: tuple[int, int] = (384, 512)
    first_seed: int = HELD_OUT_SEED_START


@dataclass(frozen=True)
class DlibReport:
    n: int
    detected: int
    mean_error: float                    # px, over detected faces and all 68 points
    group_error: tuple[tuple[str, float], ...]
    size: int

    @property
    def rate(self) -> float:
        return self.detected / self.n


def predictor_path() -> str:
    """dlib's 68-point model inside face_recognition_models, without importing that package
    (its __init__ imports pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face_recognition_models is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "models", PREDICTOR_FILE)


def dlib_landmarks(images: np.ndarray, upsample: int = 1) -> list[np.ndarray | None]:
    """dlib HOG detection + 68 landmarks of the largest face per image (None if no face)."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(predictor_path())
    out: list[np.ndarray | None] = []
    for img in images:
        rects = detector(np.ascontiguousarray(img), upsample)
        if len(rects) == 0:
            out.append(None)
            continue
        shape = predictor(img, max(rects, key=lambda r: r.area()))
        out.append(np.array([(shape.part(k).x, shape.part(k).y) for k in range(68)], dtype=np.float64))
    return out


def dlib_check(n: int, size: int = 256, seed: int = HELD_OUT_SEED_START, upsample: int = 1) -> DlibReport:
    """Render n faces (sampled attributes) and measure dlib's detection rate and the mean
    distance between its landmarks and the ground truth."""
    batch = render_batch(seed, n, size)
    found = dlib_landmarks(batch.images, upsample)
    errors = np.array([np.linalg.norm(lm - gt, axis=1) for lm, gt in zip(found, batch.landmarks) if lm is not None])
    detected = len(errors)
    if detected == 0:
        return DlibReport(n, 0, float("nan"), (), size)
    groups = tuple((name, float(errors[:, a:b].mean())) for name, a, b in LANDMARK_GROUPS)
    return DlibReport(n, detected, float(errors.mean()), groups, size)


def make_samples(out_dir: str, spec: SampleSpec = SampleSpec()) -> list[str]:
    """Write the sample PNGs and samples.json into out_dir; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    written, entries = [], []
    seed = spec.first_seed

    def next_detectable(size: int):
        """The next seed's render that dlib finds a face in (the demo edits every sample;
        the HOG detector misses a few percent of faces, e.g. some tight crops)."""
        nonlocal seed
        for _ in range(MAX_SKIPPED + 1):
            batch = render_batch(seed, 1, size)
            if dlib_landmarks(batch.images)[0] is not None:
                return batch
            log.info("seed %d: dlib finds no face in the render, skipped", seed)
            seed += 1
        raise RuntimeError(f"dlib found no face in {MAX_SKIPPED + 1} renders in a row (seeds up to {seed})")

    for k in range(spec.faces):
        batch = next_detectable(spec.face_size)
        name = f"face_{k}.png"
        Image.fromarray(batch.images[0]).save(os.path.join(out_dir, name), optimize=True)
        entries.append({
            "file": name, "kind": "face", "seed": seed, "size": spec.face_size,
            "identity": records_to_jsonable(batch.identity)[0],
            "attributes": records_to_jsonable(batch.attributes)[0],
            "landmarks": np.round(batch.landmarks[0], 3).tolist(),
        })
        written.append(name)
        seed += 1
    for k in range(spec.scenes):
        batch = next_detectable(spec.scene_face_size)
        scene = paste_into_scene(batch.images[0], np.random.default_rng(seed), spec.scene_hw, labels=batch.labels[0])
        name = f"scene_{k}.png"
        Image.fromarray(scene.image).save(os.path.join(out_dir, name), optimize=True)
        entries.append({
            "file": name, "kind": "scene", "seed": seed, "face_size": spec.scene_face_size,
            "scene_hw": list(spec.scene_hw),
            "identity": records_to_jsonable(batch.identity)[0],
            "attributes": records_to_jsonable(batch.attributes)[0],
            "face_to_scene": np.round(scene.matrix, 6).tolist(),
            "landmarks": np.round(apply_matrix(scene.matrix, batch.landmarks[0]), 3).tolist(),
        })
        written.append(name)
        seed += 1
    meta = {
        "description": "held-out synthetic faces (faceedit.world); landmarks are iBUG-68 "
                       "(x, y) pixel-index coordinates of the PNG; face_to_scene maps face-render "
                       "pixels to scene pixels",
        "samples": entries,
    }
    with open(os.path.join(out_dir, "samples.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    written.append("samples.json")
    return [os.path.join(out_dir, name) for name in written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the sample PNGs and samples.json")
    parser.add_argument("--dlib-check", type=int, default=0, metavar="N",
                        help="render N held-out faces and report dlib detection rate and landmark error")
    parser.add_argument("--size", type=int, default=256, help="render size for --dlib-check")
    parser.add_argument("--upsample", type=int, default=1, help="dlib upsampling for --dlib-check")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="time rendering N faces at --bench-size on one core")
    parser.add_argument("--bench-size", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.out or args.dlib_check or args.benchmark):
        parser.error("nothing to do: give --out, --dlib-check N and/or --benchmark N")
    if args.out:
        for path in make_samples(args.out):
            print(path, os.path.getsize(path))
    if args.dlib_check:
        rep = dlib_check(args.dlib_check, args.size, upsample=args.upsample)
        print(f"dlib detected {rep.detected}/{rep.n} ({100 * rep.rate:.0f}%) at {rep.size}px, "
              f"mean landmark error {rep.mean_error:.2f} px")
        for name, err in rep.group_error:
            print(f"  {name:12s} {err:.2f} px")
    if args.benchmark:
        rate = benchmark(args.benchmark, args.bench_size)
        print(f"render: {rate:.0f} faces/s per core at {args.bench_size}x{args.bench_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
