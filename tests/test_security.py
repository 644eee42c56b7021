"""Gateway security on a real server and real clients: TLS, mutual TLS, the bearer token,
health without a token, and the `faceedit serve` / client flags.

Every certificate is made here, in tmp_path, by the openssl command line (a throwaway CA,
a server certificate for 127.0.0.1/localhost, a client certificate, and a second, untrusted
CA with its own client certificate).
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faceedit.v1 import faceedit_pb2 as pb
from faceedit.v1 import faceedit_pb2_grpc as pb_grpc
from services.gateway.config import GatewayConfig
from services.gateway.security import BearerTokenInterceptor, SecurityError, load_token, server_credentials
from services.gateway.metrics import GatewayMetrics
from test_gateway_server import (GEN, REPO, ScriptedBackend, ServerThread, faceedit_cli,  # noqa: F401
                                 metric_value, model_set, status_of)

TOKEN = "5f0c1d2e3a4b5c6d7e8f90a1b2c3d4e5"
HEALTH = health_pb2.HealthCheckResponse


# ---------------------------------------------------------------------------------------
# a throwaway PKI


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path       # a client certificate from a CA the server does not trust
    rogue_key: Path


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def issue(dir: Path, name: str, ca: str, subject: str, extensions: str) -> None:
    """name.key + name.pem signed by ca.key/ca.pem (P-256 keys: fast to make)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject, cwd=dir)
    (dir / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=dir)


def make_ca(dir: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}", cwd=dir)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command line is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    issue(d, "server", "ca", "/CN=localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    issue(d, "client", "ca", "/CN=faceedit-test-client", "extendedKeyUsage=clientAuth\n")
    issue(d, "rogue", "rogue-ca", "/CN=faceedit-rogue-client", "extendedKeyUsage=clientAuth\n")
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key",
               rogue_cert=d / "rogue.pem", rogue_key=d / "rogue.key")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")  # the trailing newline `kubectl create secret --from-file` keeps
    return path


def tls_channel(port: int, pki: Pki, client: tuple[Path, Path] | None = None, ca: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def list_editors(channel: grpc.Channel, metadata=()) -> pb.ListEditorsResponse:
    return pb_grpc.FaceEditorStub(channel).ListEditors(pb.ListEditorsRequest(), metadata=metadata, timeout=10)


def fails_to_connect(channel: grpc.Channel) -> grpc.RpcError:
    with channel:
        err = status_of(list_editors, channel)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    return err


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ---------------------------------------------------------------------------------------
# TLS and mutual TLS


def test_tls_serves_and_plain_text_clients_fail(model_set, aligner, pki):
    server = ServerThread(GatewayConfig(model_set=model_set, tls_cert=pki.server_cert, tls_key=pki.server_key),
                          ScriptedBackend(), aligner)
    try:
        with tls_channel(server.port, pki) as channel:
            assert list_editors(channel).generator_id == GEN
            response = pb_grpc.FaceEditorStub(channel).Generate(pb.GenerateRequest(seed=1), timeout=10)
            assert response.image
        # a plain-text client cannot talk to a TLS port
        fails_to_connect(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        # nor can a TLS client that does not trust the server's CA
        fails_to_connect(tls_channel(server.port, pki, ca=pki.rogue_cert))
    finally:
        server.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_trusted_ca(model_set, aligner, pki):
    config = GatewayConfig(model_set=model_set, tls_cert=pki.server_cert, tls_key=pki.server_key,
                           tls_client_ca=pki.ca)
    server = ServerThread(config, ScriptedBackend(), aligner)
    try:
        fails_to_connect(tls_channel(server.port, pki))                                      # no client cert
        fails_to_connect(tls_channel(server.port, pki, client=(pki.rogue_cert, pki.rogue_key)))  # untrusted CA
        fails_to_connect(grpc.insecure_channel(f"127.0.0.1:{server.port}"))                  # plain text
        with tls_channel(server.port, pki, client=(pki.client_cert, pki.client_key)) as channel:
            assert list_editors(channel).generator_id == GEN
    finally:
        server.stop()


def test_unusable_tls_settings_are_refused_up_front(tmp_path, pki, model_set):
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        GatewayConfig(model_set=model_set, tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="tls_client_ca"):
        GatewayConfig(model_set=model_set, tls_client_ca=pki.ca)
    not_pem = tmp_path / "cert.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a garbage")
    with pytest.raises(SecurityError, match="not a PEM file"):
        server_credentials(GatewayConfig(model_set=model_set, tls_cert=not_pem, tls_key=pki.server_key))
    with pytest.raises(FileNotFoundError):
        server_credentials(GatewayConfig(model_set=model_set, tls_cert=tmp_path / "missing.pem", tls_key=pki.server_key))
    assert server_credentials(GatewayConfig(model_set=model_set)) is None


# ---------------------------------------------------------------------------------------
# bearer token


def test_token_is_required_except_for_health(model_set, aligner, pki, token_file):
    config = GatewayConfig(model_set=model_set, tls_cert=pki.server_cert, tls_key=pki.server_key,
                           auth_token_file=token_file, metrics_port=0, health_interval_s=0.1)
    server = ServerThread(config, ScriptedBackend(), aligner)
    try:
        with tls_channel(server.port, pki) as channel:
            stub = pb_grpc.FaceEditorStub(channel)
            refused = [
                (),                                                   # no token
                bearer("0" * len(TOKEN)),                             # wrong token, same length
                bearer(TOKEN[:-1]),                                   # a prefix of the token
                bearer(TOKEN + "0"),                                  # longer
                (("authorization", TOKEN),),                          # no scheme
                (("authorization", f"Basic {TOKEN}"),),               # another scheme
                bearer(TOKEN) + bearer("0" * len(TOKEN)),             # two credentials
            ]
            for metadata in refused:
                err = status_of(stub.ListEditors, pb.ListEditorsRequest(), metadata=metadata, timeout=10)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
                assert "Bearer" in err.details() and TOKEN not in err.details()
            # every kind of method is guarded: unary-stream and the (stream-stream) reflection service
            stream = stub.EditStream(pb.EditRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                next(reflect)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # a refused request is never parsed: bytes that are no protobuf still get UNAUTHENTICATED
            raw = channel.unary_unary("/faceedit.v1.FaceEditor/Edit")
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\xff\xff\xff not a protobuf", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

            # health needs no token (Kubernetes probes send none)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service="faceedit.v1.FaceEditor"), timeout=10).status \
                in (HEALTH.SERVING, HEALTH.NOT_SERVING)
            # the right token works; the scheme is case-insensitive
            assert stub.ListEditors(pb.ListEditorsRequest(), metadata=bearer(TOKEN), timeout=10).generator_id == GEN
            assert stub.Generate(pb.GenerateRequest(seed=2), metadata=(("authorization", f"bearer {TOKEN}"),),
                                 timeout=10).image
        text = server.metrics_text()
        assert metric_value(text, "faceedit_requests_total", code="UNAUTHENTICATED", method="ListEditors") == len(refused)
        assert metric_value(text, "faceedit_requests_total", code="OK", method="ListEditors") == 1
    finally:
        server.stop()


def test_token_works_on_plain_text_too_and_is_never_logged(model_set, aligner, caplog, monkeypatch):
    monkeypatch.setenv("FACEEDIT_TEST_TOKEN", f"  {TOKEN}\n")
    caplog.set_level(logging.DEBUG)
    server = ServerThread(GatewayConfig(model_set=model_set, auth_token_env="FACEEDIT_TEST_TOKEN"),
                          ScriptedBackend(), aligner)
    try:
        err = status_of(server.stub.ListEditors, pb.ListEditorsRequest(), metadata=bearer("x" * 40), timeout=10)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.stub.ListEditors(pb.ListEditorsRequest(), metadata=bearer(TOKEN), timeout=10).generator_id == GEN
    finally:
        server.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "plain text" in logged and "refused a call to /faceedit.v1.FaceEditor/ListEditors" in logged
    assert TOKEN not in logged and "x" * 40 not in logged


def test_token_sources_and_their_errors(tmp_path, model_set):
    assert load_token(GatewayConfig(model_set=model_set)) is None
    config = GatewayConfig(model_set=model_set, auth_token_env="TOKEN_VAR")
    assert load_token(config, {"TOKEN_VAR": TOKEN}) == TOKEN.encode()
    with pytest.raises(SecurityError, match="TOKEN_VAR.*not set"):
        load_token(config, {})
    with pytest.raises(SecurityError, match="has 5 characters; at least 16") as info:
        load_token(config, {"TOKEN_VAR": "short"})
    assert "short" not in str(info.value)  # the message never quotes the secret
    with pytest.raises(SecurityError, match="without spaces"):
        load_token(config, {"TOKEN_VAR": "two words " + TOKEN})
    with pytest.raises(FileNotFoundError):
        load_token(GatewayConfig(model_set=model_set, auth_token_file=tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        GatewayConfig(model_set=model_set, auth_token_file=tmp_path / "t", auth_token_env="X")


def test_token_check_is_exact():
    """The interceptor's rule on its own: one header, the Bearer scheme, the exact token."""
    check = BearerTokenInterceptor(TOKEN.encode(), GatewayMetrics()).authorized
    assert check(bearer(TOKEN)) and check((("authorization", f"BEARER {TOKEN}"),))
    assert check((("x-request-id", "a"),) + bearer(TOKEN))
    for metadata in (None, (), bearer(""), bearer(TOKEN.upper()), bearer(TOKEN[1:]), bearer(TOKEN) * 2,
                     (("authorization", f"Bearer{TOKEN}"),), (("authorization", b"Bearer " + TOKEN.encode()),)):
        assert not check(metadata), metadata


# ---------------------------------------------------------------------------------------
# `faceedit serve` and the client verbs with every security flag


def test_serve_and_client_with_mutual_tls_and_a_token(model_set, pki, token_file, tmp_path):
    # the scripted set has no ONNX files: served through a (down) Triton, which ListEditors
    # does not need; the point is the flags end to end
    proc = subprocess.Popen(
        [sys.executable, "-m", "faceedit", "serve", "--model-set", str(model_set), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--health-port", "0", "--backend", "triton",
         "--triton-url", "127.0.0.1:1", "--grace", "1", "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca), "--token-file", str(token_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on port" in line, line + proc.stderr.read()
        port = int(line.split("listening on port ")[1].split()[0])
        health_port = int(line.split("health on port ")[1].rstrip(")\n"))
        server = f"127.0.0.1:{port}"
        tls = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))

        listing = faceedit_cli("editors", "--server", server, "--json", *tls, "--token-file", str(token_file))
        assert listing.returncode == 0, listing.stderr
        assert json.loads(listing.stdout)["generator_id"] == GEN
        assert faceedit_cli("editors", "--server", server, *tls, "--token", TOKEN).returncode == 0

        no_token = faceedit_cli("editors", "--server", server, *tls)
        assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
        no_cert = faceedit_cli("editors", "--server", server, "--tls-ca", str(pki.ca), "--token", TOKEN)
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
        half = faceedit_cli("editors", "--server", server, "--tls-cert", str(pki.client_cert), "--token", TOKEN)
        assert half.returncode == 2 and "--tls-key" in half.stderr

        # probes: health alone on a plain-text port, no token, no certificate
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == HEALTH.NOT_SERVING  # its Triton is down; the answer is what matters
            err = status_of(list_editors, channel)
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health on that port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert TOKEN not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    bad = faceedit_cli("serve", "--model-set", str(model_set), "--port", "0", "--metrics-port", "0",
                       "--backend", "triton", "--tls-cert", str(pki.server_key), "--tls-key", str(pki.server_key))
    assert bad.returncode == 2  # a key where the certificate belongs is still PEM: grpc refuses it
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    bad = faceedit_cli("serve", "--model-set", str(model_set), "--port", "0", "--metrics-port", "0",
                       "--backend", "triton", "--tls-cert", str(not_pem), "--tls-key", str(pki.server_key))
    assert bad.returncode == 2 and "not a PEM file" in bad.stderr
