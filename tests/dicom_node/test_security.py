"""Who may send: the per-peer allow-list (calling AE title and source address) and DICOM TLS,
including mutual TLS, with certificates made by the test with the ``openssl`` command."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.errors import DestinationUnavailable
from dicom_node.node import NodeConfig
from dicom_node.scu import RemoteNode, echo, send_files
from dicom_node.settings import DestinationTLSSettings, ListenerTLSSettings, PeerSettings
from tests.dicom_node.conftest import Configure, StartNode
from tests.dicom_node.helpers import small_study
from tests.pki import Identity, Pki, make_pki
from tests.servers import connect_from, echoscu, run_tool, seconds_until_closed, storescu

# --- certificates -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- nodes --------------------------------------------------------------------------------------


def _associate_echo(port: int, calling_aet: str, bind_ip: str = "127.0.0.1") -> tuple[bool, bool]:
    """(established, rejected) for a C-ECHO association from ``calling_aet`` at ``bind_ip``."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI", bind_address=(bind_ip, 0))
    established, rejected = assoc.is_established, assoc.is_rejected
    if established:
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    return established, rejected


def _peers(*pairs: tuple[str, str]) -> Configure:
    def configure(config: NodeConfig) -> None:
        config.listener.peers = [
            PeerSettings.model_validate({"ae_title": a, "address": ip}) for a, ip in pairs
        ]

    return configure


# --- allow-list ---------------------------------------------------------------------------------


def test_unknown_calling_ae_is_rejected_at_association(start_node: StartNode) -> None:
    node = start_node(_peers(("CR_ER_1", "127.0.0.1")))
    assert _associate_echo(node.port, "STRANGER") == (False, True)
    # A real client hears the same A-ASSOCIATE-RJ.
    result = echoscu("127.0.0.1", node.port, "PACSAI", calling_aet="STRANGER")
    assert result.returncode != 0
    assert "Rejected" in result.stderr + result.stdout
    assert node.index.list_studies() == []


def test_allowed_peer_is_accepted_and_can_store(start_node: StartNode, tmp_path: Path) -> None:
    node = start_node(_peers(("CR_ER_1", "127.0.0.0/8"), ("PACS", "10.1.2.3")))
    assert _associate_echo(node.port, "CR_ER_1") == (True, False)
    files = small_study(tmp_path / "in")
    result = storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI",
                      calling_aet="CR_ER_1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert node.index.instance(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is not None


def test_allowed_ae_title_from_another_address_is_rejected(start_node: StartNode) -> None:
    node = start_node(_peers(("CR_ER_1", "127.0.0.1")))
    # Linux routes all of 127/8 to loopback: 127.0.0.2 is a different sender on the same host.
    assert _associate_echo(node.port, "CR_ER_1", bind_ip="127.0.0.2") == (False, True)
    assert _associate_echo(node.port, "CR_ER_1", bind_ip="127.0.0.1") == (True, False)


def test_empty_peer_list_accepts_any_calling_ae(start_node: StartNode) -> None:
    node = start_node()
    assert _associate_echo(node.port, "ANYONE") == (True, False)


# --- TLS ----------------------------------------------------------------------------------------


def _tls_listener(pki: Pki, *, mutual: bool) -> Configure:
    def configure(config: NodeConfig) -> None:
        config.listener.tls = ListenerTLSSettings(
            enabled=True,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            ca_file=pki.ca if mutual else None,
        )

    return configure


def _remote(port: int, tls: DestinationTLSSettings | None) -> RemoteNode:
    return RemoteNode("PACSAI", "127.0.0.1", port, "MODALITY", 10.0, tls)


def _client_tls(pki: Pki, identity: Identity | None = None) -> DestinationTLSSettings:
    return DestinationTLSSettings(
        enabled=True,
        ca_file=pki.ca,
        cert_file=identity.cert if identity else None,
        key_file=identity.key if identity else None,
    )


def test_tls_listener_stores_over_tls(start_node: StartNode, pki: Pki, tmp_path: Path) -> None:
    node = start_node(_tls_listener(pki, mutual=False))
    files = small_study(tmp_path / "in")
    assert send_files(_remote(node.port, _client_tls(pki)), files) == [0x0000]
    assert node.index.instance(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is not None


def test_scu_refuses_a_listener_whose_certificate_it_cannot_verify(
    start_node: StartNode, pki: Pki
) -> None:
    node = start_node(_tls_listener(pki, mutual=False))
    untrusting = DestinationTLSSettings(enabled=True, ca_file=pki.stranger_ca)
    with pytest.raises(DestinationUnavailable):
        echo(_remote(node.port, untrusting))


def test_plain_connection_to_tls_port_fails_cleanly_and_listener_keeps_serving(
    start_node: StartNode, pki: Pki
) -> None:
    node = start_node(_tls_listener(pki, mutual=False))
    with pytest.raises(DestinationUnavailable):
        echo(_remote(node.port, None))
    # A client that connects and never speaks does not hold up the others either.
    with socket.create_connection(("127.0.0.1", node.port)):
        assert echo(_remote(node.port, _client_tls(pki))) == 0x0000


def test_mutual_tls_accepts_a_client_certificate_from_the_hospital_ca(
    start_node: StartNode, pki: Pki, tmp_path: Path
) -> None:
    node = start_node(_tls_listener(pki, mutual=True))
    assert echo(_remote(node.port, _client_tls(pki, pki.client))) == 0x0000
    # dcmtk as the modality, with its own certificate.
    files = small_study(tmp_path / "in")
    result = storescu(
        files,
        host="127.0.0.1",
        port=node.port,
        called_aet="PACSAI",
        extra_args=("+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca)),
    )
    assert result.returncode == 0, result.stderr
    assert node.index.instance(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is not None


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    start_node: StartNode, pki: Pki
) -> None:
    node = start_node(_tls_listener(pki, mutual=True))
    with pytest.raises(DestinationUnavailable):
        echo(_remote(node.port, _client_tls(pki)))  # no client certificate
    with pytest.raises(DestinationUnavailable):
        echo(_remote(node.port, _client_tls(pki, pki.stranger)))
    result = run_tool("echoscu", ["-aec", "PACSAI", "+tla", "+cf", str(pki.ca), "127.0.0.1",
                                  str(node.port)])  # fmt: skip
    assert result.returncode != 0
    assert echo(_remote(node.port, _client_tls(pki, pki.client))) == 0x0000


def test_echo_and_send_commands_speak_mutual_tls(
    start_node: StartNode, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    node = start_node(_tls_listener(pki, mutual=True))
    address = f"PACSAI@127.0.0.1:{node.port}"
    identity = ["--ca", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    assert main(["echo", address, *identity]) == 0
    files = small_study(tmp_path / "in")
    assert main(["send", *map(str, files), "--to", address, *identity]) == 0
    assert node.index.instance(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is not None
    # Without the client certificate, or without TLS at all, the listener says no.
    assert main(["echo", address, "--ca", str(pki.ca)]) != 0
    assert main(["echo", address]) != 0
    assert "FAILED" in capsys.readouterr().err


# --- connections that never associate -----------------------------------------------------------

ATTACKER = "127.0.0.2"  # Linux routes all of 127/8 to loopback: another host on this one
ACSE_TIMEOUT = 4.0


def _associate_rq(calling_aet: str = "STRANGER") -> bytes:
    """The A-ASSOCIATE-RQ PDU a C-ECHO client sends, as bytes on the wire."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_aet
    primitive.called_ae_title = "PACSAI"
    primitive.calling_presentation_address = AddressInformation("127.0.0.2", 11112)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 11112)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = 16384
    implementation.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _hostile_openings() -> list[bytes]:
    """What a connection sends before it falls silent: each is a different way to stall."""
    request = _associate_rq()
    return [
        b"",  # nothing at all
        b"\x01\x00\x00",  # a few header bytes
        request[: len(request) // 2],  # half an association request
        b"\x01\x00" + struct.pack(">L", 4000) + b"\x00" * 10,  # a long PDU announced, 10 bytes sent
        b"\x04\x00" + struct.pack(">L", 100) + b"\x00" * 4,  # P-DATA before any association
        b"\x07\x00" + struct.pack(">L", 50),  # an A-ABORT header with its body missing
    ]


def _lockout(config: NodeConfig, processes: int) -> None:
    config.listener.peers = [
        PeerSettings.model_validate({"ae_title": aet, "address": "127.0.0.1"})
        for aet in ("CR_ER_1", "MODALITY")
    ]
    config.listener.acse_timeout_s = ACSE_TIMEOUT
    config.listener.max_associations = 4
    config.listener.processes = processes


def _trickle(sock: socket.socket, data: bytes, every: float) -> threading.Thread:
    """Send ``data`` a byte at a time, one every ``every`` seconds, until the listener closes."""

    def run() -> None:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("processes", [1, 2])
def test_stalled_connections_neither_lock_out_allowed_senders_nor_outlive_the_acse_timeout(
    start_node: StartNode, tmp_path: Path, processes: int
) -> None:
    node = start_node(lambda config: _lockout(config, processes))
    files = small_study(tmp_path / "in")
    opened_at = time.monotonic()
    # From one address and from several: more stalled connections than there are association
    # slots (4), and more than one address may hold (8 pending).
    attackers = [
        connect_from(node.port, f"127.0.0.{2 + n % 3}", opening)
        for n in range(4)
        for opening in _hostile_openings()
    ]
    # A byte every half second: no single read ever waits the ACSE timeout, the whole does.
    trickle = connect_from(node.port, "127.0.0.5", b"")
    _trickle(trickle, _associate_rq(), every=0.5)
    # Meanwhile the allowed sender stores a study, and others still echo.
    result = storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI",
                      calling_aet="CR_ER_1")  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert node.index.instance(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is not None
    assert _associate_echo(node.port, "CR_ER_1") == (True, False)
    held = node.pool.pending()
    assert sum(held.values()) >= 10, f"the attackers were not holding connections: {held}"
    assert time.monotonic() - opened_at < ACSE_TIMEOUT, "served while the attackers held on"
    # Every stalled connection is closed once the ACSE timeout has passed, none much later.
    closed_after = []
    for sock in [*attackers, trickle]:
        seconds_until_closed(sock, ACSE_TIMEOUT + 3)
        closed_after.append(time.monotonic() - opened_at)
    print(
        f"\n{len(closed_after)} stalled connections closed {min(closed_after):.2f}-"
        f"{max(closed_after):.2f} s after they were opened (ACSE timeout {ACSE_TIMEOUT:g} s)"
    )
    assert time.monotonic() - opened_at < ACSE_TIMEOUT + 3
    # The association servers report each close to the acceptor (another process, maybe).
    deadline = time.monotonic() + 2
    while node.pool.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.pool.pending() == {}
    assert _associate_echo(node.port, "CR_ER_1") == (True, False)


def test_one_address_holds_at_most_its_share_of_pending_connections(
    start_node: StartNode,
) -> None:
    def configure(config: NodeConfig) -> None:
        _lockout(config, 1)
        config.listener.max_pending_per_address = 3

    node = start_node(configure)
    held = [connect_from(node.port, ATTACKER, b"") for _ in range(3)]
    deadline = time.monotonic() + 2
    while node.pool.pending().get(ATTACKER, 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.pool.pending() == {ATTACKER: 3}
    extra = connect_from(node.port, ATTACKER, b"")
    assert seconds_until_closed(extra, 1.0) < 1.0, "a fourth is closed at once"
    assert _associate_echo(node.port, "CR_ER_1") == (True, False), "others are served"
    for sock in held:
        sock.close()


def test_silent_tls_connections_are_closed_by_the_acse_timeout(
    start_node: StartNode, pki: Pki
) -> None:
    def configure(config: NodeConfig) -> None:
        _tls_listener(pki, mutual=False)(config)
        _lockout(config, 2)

    node = start_node(configure)
    # No ClientHello, and half of one: the handshake is a read like any other before the
    # association, bounded by the same deadline.
    silent = [connect_from(node.port, ATTACKER, b"") for _ in range(6)]
    half_hello = [connect_from(node.port, ATTACKER, b"\x16\x03\x01\x02\x00\x01") for _ in range(2)]
    assert echo(_remote(node.port, _client_tls(pki))) == 0x0000
    for sock in [*silent, *half_hello]:
        seconds_until_closed(sock, ACSE_TIMEOUT + 3)


def test_allowed_senders_beyond_max_associations_are_told_to_come_back_later(
    start_node: StartNode,
) -> None:
    node = start_node(lambda config: _lockout(config, 1))
    ae = AE(ae_title="CR_ER_1")
    ae.add_requested_context(Verification)
    running = [ae.associate("127.0.0.1", node.port, ae_title="PACSAI") for _ in range(4)]
    try:
        assert all(a.is_established for a in running)
        busy = ae.associate("127.0.0.1", node.port, ae_title="PACSAI")
        assert busy.is_rejected
        assert (busy.acceptor.primitive.result, busy.acceptor.primitive.diagnostic) == (0x02, 0x02)
    finally:
        for assoc in running:
            assoc.release()
    assert _associate_echo(node.port, "CR_ER_1") == (True, False)
