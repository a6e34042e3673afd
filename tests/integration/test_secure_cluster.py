"""A whole cluster over mutual TLS with tokens: the daemon, its executors and the client all authenticate."""

from __future__ import annotations

from certs import make_certs

from distinfer.client.api import Client
from distinfer.client.local import LocalCluster
from distinfer.common.channels import ChannelSecurity


def test_job_over_mutual_tls_with_client_and_join_tokens(tmp_path):
    certs = make_certs(tmp_path / "certs")
    tls_as_client = ("--tls-ca", certs["ca"], "--tls-cert", certs["client_cert"], "--tls-key", certs["client_key"])
    client_security = ChannelSecurity(
        token="client-secret", ca_file=certs["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"]
    )
    cluster = LocalCluster(
        slots=2,
        state_dir=tmp_path / "cluster",
        extra_coordinator_args=(
            "--tls-cert",
            certs["server_cert"],
            "--tls-key",
            certs["server_key"],
            "--tls-client-ca",
            certs["ca"],
        ),
        extra_worker_args=tls_as_client,
        # Tokens travel in the environment, as the docs advise: flags show in `ps`.
        env={"DISTINFER_CLIENT_TOKEN": "client-secret", "DISTINFER_JOIN_TOKEN": "join-secret"},
        security=client_security,
    )
    with cluster, Client(cluster.address, client_security) as client:
        job = client.submit(["a secure row", "another one", "a third"], model="all-MiniLM-L6-v2", workers=2)
        assert [r["index"] for r in job.results()] == [0, 1, 2]
        assert client.job(job.id).status().attempts[-1].world_size == 2
