"""The generated stubs in faceedit/v1/ are current with protos/, and the API keeps its shape."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from faceedit import protos
from faceedit.client import latent_message
from faceedit.v1 import faceedit_pb2 as pb

GENERATED = protos.REPO_ROOT / "faceedit" / "v1"


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    fresh = protos.generate(out_dir=tmp_path)
    assert fresh, "protoc wrote nothing"
    names = sorted(p.name for p in fresh)
    installed = sorted(p.name for p in GENERATED.glob("*_pb2*.py*"))
    assert installed == names, (f"faceedit/v1 has {installed}, protos/ generate {names}; "
                                "run `python -m faceedit.protos`")
    stale = [n for n in names if (GENERATED / n).read_bytes() != (tmp_path / "faceedit" / "v1" / n).read_bytes()]
    assert not stale, f"stale generated stubs {stale}; run `python -m faceedit.protos`"


def test_service_has_every_rpc() -> None:
    service = pb.DESCRIPTOR.services_by_name["FaceEditor"]
    assert service.full_name == "faceedit.v1.FaceEditor"
    rpcs = {m.name: m for m in service.methods}
    assert set(rpcs) == {"Invert", "Edit", "EditStream", "Generate", "Interpolate", "ListEditors"}
    assert rpcs["EditStream"].server_streaming and not rpcs["Edit"].server_streaming
    assert rpcs["EditStream"].input_type.name == "EditRequest"


def test_edit_methods_cover_the_papers() -> None:
    names = set(pb.EditMethod.keys())
    for method in ("DIRECTION", "GANSPACE", "SEFA", "STYLESPACE", "STYLE_INTERVENTION", "MAPPER",
                   "OPTIMIZATION", "MASKED_OPTIMIZATION", "CROSSOVER", "EXPRESSION_TRANSFER"):
        assert f"EDIT_METHOD_{method}" in names
    # zero means "the default" for every enum, so old clients keep their behaviour
    for enum in (pb.EditMethod, pb.LatentSpace, pb.ImageFormat, pb.FaceSelection, pb.OutputRegion):
        assert enum.Name(0).endswith("_UNSPECIFIED")


def test_edit_request_sources_and_options_are_oneofs() -> None:
    request = pb.EditRequest(image=b"x")
    request.latent.generator_id = "g"
    assert request.WhichOneof("source") == "latent" and request.image == b""
    request.stylespace.channels.add(layer=1, channel=2, strength=3.0)
    request.crossover.split_layer = 4
    assert request.WhichOneof("options") == "crossover"
    assert not request.HasField("stylespace")


def test_latent_round_trips_little_endian_float32() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    msg = pb.Latent.FromString(latent_message(arr, "gen", pb.LATENT_SPACE_W_PLUS).SerializeToString())
    assert list(msg.shape) == [3, 4] and msg.space == pb.LATENT_SPACE_W_PLUS
    assert np.array_equal(np.frombuffer(msg.data, "<f4").reshape(3, 4), arr)
