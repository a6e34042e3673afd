"""Tokens (clients vs workers), TLS and mutual TLS, against a real coordinator server."""

from __future__ import annotations

import grpc
import pytest
from certs import make_certs
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distinfer.client.api import Client
from distinfer.common.channels import ChannelSecurity, open_channel
from distinfer.v1 import jobs_pb2, workers_pb2, workers_pb2_grpc

CLIENT_TOKEN, JOIN_TOKEN = "client-secret", "join-secret"


@pytest.fixture
def guarded(tmp_path, coordinator_class):
    server = coordinator_class(tmp_path / "state", client_token=CLIENT_TOKEN, join_token=JOIN_TOKEN)
    address = server.start()
    yield address
    server.stop()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def register(address: str, token: str):
    with open_channel(address) as channel:
        request = workers_pb2.RegisterWorkerRequest(
            hostname="h",
            advertise_host="127.0.0.1",
            slots=[workers_pb2.Slot(index=0, device="cpu")],
            port_lo=29500,
            port_hi=29510,
        )
        return workers_pb2_grpc.WorkersStub(channel).RegisterWorker(
            request, timeout=5, metadata=ChannelSecurity(token=token).metadata()
        )


def test_clients_need_the_client_token(guarded):
    with Client(guarded, ChannelSecurity()) as anonymous:
        code, details = status_of(anonymous.jobs)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "needs a bearer token from clients" in details
        # Streaming calls are refused the same way, before any row is read.
        assert status_of(lambda: list(anonymous.job("j-x").results()))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert status_of(lambda: anonymous.submit(["a"], model="m"))[0] == grpc.StatusCode.UNAUTHENTICATED
    with Client(guarded, ChannelSecurity(token="guess")) as wrong:
        assert status_of(wrong.jobs) == (grpc.StatusCode.UNAUTHENTICATED, "the token is not valid for this coordinator")
    with Client(guarded, ChannelSecurity(token=CLIENT_TOKEN)) as client:
        assert client.jobs() == []
        assert client.submit(["a"], model="m").num_rows == 1


def test_worker_and_client_tokens_are_not_interchangeable(guarded):
    with Client(guarded, ChannelSecurity(token=JOIN_TOKEN)) as worker_posing_as_client:
        code, details = status_of(worker_posing_as_client.jobs)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not for clients" in details
    code, details = status_of(lambda: register(guarded, CLIENT_TOKEN))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not for workers" in details
    assert status_of(lambda: register(guarded, ""))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert register(guarded, JOIN_TOKEN).worker_id


def test_health_stays_open_for_probes(guarded):
    with open_channel(guarded) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_and_mutual_tls(tmp_path, coordinator_class):
    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other", ca_name="someone else's CA")
    server = coordinator_class(
        tmp_path / "state", tls_cert=certs["server_cert"], tls_key=certs["server_key"], tls_client_ca=certs["ca"]
    )
    address = server.start()
    try:
        mutual = ChannelSecurity(ca_file=certs["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"])
        with Client(address, mutual) as client:
            assert client.jobs() == []
        refused = {
            "plaintext": ChannelSecurity(),
            "no client certificate": ChannelSecurity(ca_file=certs["ca"]),
            "a client certificate from another CA": ChannelSecurity(
                ca_file=certs["ca"], cert_file=other["client_cert"], key_file=other["client_key"]
            ),
            "a server it does not trust": ChannelSecurity(
                ca_file=other["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"]
            ),
        }
        for why, security in refused.items():
            with Client(address, security) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=3)
                assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), why
    finally:
        server.stop()


def test_server_tls_without_client_certificates(tmp_path, coordinator_class):
    certs = make_certs(tmp_path / "certs")
    server = coordinator_class(tmp_path / "state", tls_cert=certs["server_cert"], tls_key=certs["server_key"])
    address = server.start()
    try:
        with Client(address, ChannelSecurity(ca_file=certs["ca"])) as client:
            assert client.jobs() == []
    finally:
        server.stop()


def test_half_configured_tls_is_refused_with_a_sentence(tmp_path):
    from distinfer.coordinator.server import CoordinatorConfig

    with pytest.raises(ValueError, match="both the server certificate and its key"):
        CoordinatorConfig(tls_cert="server.crt")
    with pytest.raises(ValueError, match="must differ"):
        from distinfer.common.auth import TokenAuth

        TokenAuth("same", "same")


def test_a_worker_refused_by_the_coordinator_says_why_in_one_line(guarded):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DISTINFER_JOIN_TOKEN"}
    worker = subprocess.run(
        [sys.executable, "-m", "distinfer.worker.main", "--coordinator", guarded, "--slots", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert worker.returncode == 1 and "Traceback" not in worker.stderr, worker.stderr
    assert worker.stderr.strip().splitlines()[-1] == (
        f"distinfer-worker: cannot join the coordinator at {guarded}: UNAUTHENTICATED: this coordinator needs a "
        "bearer token from workers: start distinfer-worker with DISTINFER_JOIN_TOKEN set to the coordinator's "
        "join token"
    )
