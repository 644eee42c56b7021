"""Generate the Python stubs of protos/faceedit/v1/*.proto into faceedit/v1/.

Run at install/build time (`make install`, the Docker build). The generated files are not
committed; `tests/test_protos.py` proves they are current with the .proto sources.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "faceedit" / "v1").glob("*.proto"))


def generate(out_dir: Path = REPO_ROOT, root: Path = PROTO_ROOT) -> list[Path]:
    """Run grpc_tools.protoc on every proto; returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    files = proto_files(root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {root / 'faceedit' / 'v1'}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(f.relative_to(root)) for f in files],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    written = sorted((out_dir / "faceedit" / "v1").glob("*_pb2*.py*"))
    log.info("generated %d stub files", len(written))
    return written


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        generate()
    except (FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
