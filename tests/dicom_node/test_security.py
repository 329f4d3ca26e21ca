"""Who may send: the per-peer allow-list (calling AE title and source address) and DICOM TLS,
including mutual TLS, with certificates made by the test with the ``openssl`` command."""

from __future__ import annotations

import socket
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
from tests.servers import echoscu, run_tool, storescu

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
