"""Which address a worker advertises for rendezvous when the operator does not say."""

from __future__ import annotations

import socket

import pytest

from distinfer.worker.daemon import default_advertise_host


def test_loopback_when_the_coordinator_is_on_this_machine():
    assert default_advertise_host("127.0.0.1:50051") == "127.0.0.1"
    assert default_advertise_host("localhost:50051") == "127.0.0.1"


def test_a_remote_coordinator_gets_the_hosts_resolved_address(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.1.2.3")
    assert default_advertise_host("head:50051") == "10.1.2.3"


def test_a_loopback_name_with_a_remote_coordinator_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")  # Debian's /etc/hosts habit
    with pytest.raises(ValueError, match="pass --advertise-host"):
        default_advertise_host("head:50051")
