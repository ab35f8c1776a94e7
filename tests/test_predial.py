"""Connections opened while a run sets up (`transports.predial`), against real sshd hosts."""

from __future__ import annotations

import threading
import time

import pytest

from maintenancebot.errors import ConnectError
from maintenancebot.models import Host
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports.base import Command, Transport
from maintenancebot.transports.predial import Predial, _Dialing
from maintenancebot.transports.ssh import SshTransport
from tests.test_transports import wait_until


def dialer(fleet: Fleet) -> Predial:
    return Predial([], lambda host: SshTransport(host, fleet.ssh_settings))


def predial(fleet: Fleet, hosts: list[Host]) -> Predial:
    return Predial(hosts, lambda host: SshTransport(host, fleet.ssh_settings))


def test_connections_open_before_anyone_asks_and_each_is_handed_out_once(fleet: Fleet) -> None:
    first, second = fleet.hosts[:2]
    logins = {host.name: fleet.logins(host.name) for host in (first, second)}
    with predial(fleet, [first, second]) as dialing:
        assert wait_until(lambda: fleet.connections(first.name) == fleet.connections(
            second.name) == 1), "nobody asked yet, and both hosts are connected"
        taken = dialing.open(first)
        assert taken.run(Command("echo hi")).stdout == "hi\n"
        fresh = dialing.open(first)  # taken already: the next one is a connection of its own
        assert fresh.run(Command("echo again")).stdout == "again\n"
        assert fleet.connections(first.name) == 2
        fresh.close()
        taken.close()
    assert wait_until(lambda: fleet.connections(first.name) == fleet.connections(
        second.name) == 0), "the connection nobody took is closed with the Predial"
    assert fleet.logins(first.name) - logins[first.name] == 2
    assert fleet.logins(second.name) - logins[second.name] == 1


def test_a_failed_dial_is_raised_by_connect_as_a_fresh_connection_raises_it_and_not_retried(
        fleet: Fleet) -> None:
    ghost = fleet.host(fleet.names[0]).model_copy(
        update={"name": "ghost", "address": "127.0.0.1", "port": 9})  # nothing listens
    dials: list[str] = []

    class Counted(SshTransport):
        def connect(self) -> None:
            dials.append(self.host.name)
            super().connect()

    with Predial([ghost], lambda host: Counted(host, fleet.ssh_settings)) as dialing:
        transport = dialing.open(ghost)
        with pytest.raises(ConnectError) as predialed:
            transport.connect()
    assert dials == ["ghost"], "the host's connect() reported the dial's error, not a second dial"
    with pytest.raises(ConnectError) as fresh:
        SshTransport(ghost, fleet.ssh_settings).connect()
    assert str(predialed.value) == str(fresh.value)
    assert "refused" in str(fresh.value)


def test_closing_during_a_handshake_does_not_wait_and_closes_it_once_open(fleet: Fleet) -> None:
    entered, gate = threading.Event(), threading.Event()

    class Held(SshTransport):  # a handshake still going: held until the test lets it go
        def connect(self) -> None:
            entered.set()
            assert gate.wait(30)
            super().connect()

    host = fleet.host(fleet.names[1])
    logins = fleet.logins(host.name)
    dialing = Predial([host], lambda h: Held(h, fleet.ssh_settings))
    assert entered.wait(10)
    started = time.monotonic()
    dialing.close()
    assert time.monotonic() - started < 1, "close() waited for the handshake"
    gate.set()
    assert wait_until(lambda: fleet.logins(host.name) - logins == 1), "the dial went through"
    assert wait_until(lambda: fleet.connections(host.name) == 0), "and was closed at once"


def test_a_dial_closed_before_it_began_never_connects(fleet: Fleet) -> None:
    host = fleet.host(fleet.names[2])
    logins = fleet.logins(host.name)
    go = threading.Event()
    dial = _Dialing(SshTransport(host, fleet.ssh_settings), go)  # started, waiting for `go`
    dial.close()
    go.set()
    time.sleep(0.5)
    assert fleet.logins(host.name) == logins and fleet.connections(host.name) == 0


def test_if_making_a_transport_fails_the_ones_made_before_never_connect(fleet: Fleet) -> None:
    first, second = fleet.hosts[:2]
    logins = fleet.logins(first.name)

    def factory(host: Host) -> Transport:
        if host.name == second.name:
            raise RuntimeError("no transport for this one")
        return SshTransport(host, fleet.ssh_settings)

    with pytest.raises(RuntimeError):
        Predial([first, second], factory)
    time.sleep(0.5)
    assert fleet.logins(first.name) == logins and fleet.connections(first.name) == 0


def test_a_different_host_under_a_pre_dialed_name_gets_its_own_connection(fleet: Fleet) -> None:
    dialed, other = fleet.host(fleet.names[0]), fleet.host(fleet.names[1])
    renamed = other.model_copy(update={"name": dialed.name})
    with predial(fleet, [dialed]) as dialing:
        assert wait_until(lambda: fleet.connections(dialed.name) == 1)
        transport: Transport = dialing.open(renamed)
        try:
            sshd_port = transport.run(Command("echo $SSH_CONNECTION")).stdout.split()[3]
        finally:
            transport.close()
        assert int(sshd_port) == other.port
        assert wait_until(lambda: fleet.connections(dialed.name) == 0), "never reused, closed"


def test_hosts_not_pre_dialed_get_fresh_connections(fleet: Fleet) -> None:
    host = fleet.host(fleet.names[2])
    with dialer(fleet) as dialing:
        assert fleet.connections(host.name) == 0
        transport = dialing.open(host)
        assert isinstance(transport, SshTransport)
        transport.close()
