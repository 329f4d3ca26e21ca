"""Association set-up from remembered steps: the same requests, negotiations and answers as
pynetdicom's own, and the checks on each association (AE titles, allow-list) made every time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import (
    PresentationContext,
    StoragePresentationContexts,
    build_context,
    negotiate_as_acceptor,
)

from dicom_node import negotiation
from dicom_node.node import NodeConfig
from dicom_node.scp import build_ae
from dicom_node.settings import ListenerSettings, PeerSettings
from tests.dicom_node.conftest import StartNode
from tests.dicom_node.helpers import small_study
from tests.servers import storescu

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"]


def _request(calling: str, called: str = "PACSAI", identity: bool = False) -> bytes:
    """An A-ASSOCIATE-RQ as a sender proposing 120 storage contexts encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for number, context in enumerate(StoragePresentationContexts[:120]):
        proposed = build_context(str(context.abstract_syntax), TRANSFER_SYNTAXES[: 1 + number % 3])
        proposed.context_id = 2 * number + 1
        contexts.append(proposed)
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.276.0.7230010.3.0.3.6.8"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "OFFIS_DCMTK_368"
    items: list[Any] = [maximum, implementation, version]
    if identity:
        user = UserIdentityNegotiation()
        user.user_identity_type = 2
        user.primary_field = b"radiographer"
        user.secondary_field = b"secret-password"
        items.append(user)
    primitive.user_information = items
    return A_ASSOCIATE_RQ(primitive).encode()


def _described(primitive: A_ASSOCIATE) -> tuple[Any, ...]:
    return (
        primitive.calling_ae_title,
        primitive.called_ae_title,
        str(primitive.application_context_name),
        _contexts(primitive.presentation_context_definition_list),
        [(type(i).__name__, sorted(vars(i).items())) for i in primitive.user_information],
    )


def _contexts(contexts: list[PresentationContext]) -> list[dict[str, Any]]:
    return [dict(vars(c)) for c in contexts]


def _pynetdicoms(data: bytes) -> A_ASSOCIATE_RQ:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    return pdu


def test_a_request_seen_before_decodes_to_what_pynetdicom_decodes() -> None:
    first, second = _request("MODALITY_A"), _request("MODALITY_B", called="OTHER")
    assert first[74:] == second[74:]  # only the AE titles differ

    for data in (first, second, first):
        pdu = negotiation.decode_associate_rq(data)
        assert isinstance(pdu, negotiation.RememberedRQ)
        expected = _pynetdicoms(data)
        assert pdu.protocol_version == expected.protocol_version
        assert _described(pdu.to_primitive()) == _described(expected.to_primitive())
    assert isinstance(negotiation.decode_associate_rq(second), negotiation.RememberedRQ)
    # Each primitive is its own: changing one leaves the next as it was.
    pdu = negotiation.decode_associate_rq(first)
    changed = pdu.to_primitive()
    changed.presentation_context_definition_list[0].transfer_syntax.append(UID("1.2.3"))
    assert _described(pdu.to_primitive()) == _described(_pynetdicoms(first).to_primitive())


def test_a_request_with_user_identity_is_decoded_by_pynetdicom_every_time() -> None:
    data = _request("MODALITY_A", identity=True)
    pdu = negotiation.decode_associate_rq(data)
    assert not isinstance(pdu, negotiation.RememberedRQ)
    assert _described(pdu.to_primitive()) == _described(_pynetdicoms(data).to_primitive())
    assert negotiation._requests.get(data[74:]) is None  # its credentials are not kept


def test_a_remembered_negotiation_is_pynetdicoms_and_each_result_is_fresh() -> None:
    supported = build_ae(ListenerSettings()).supported_contexts
    pdu = negotiation.decode_associate_rq(_request("MODALITY_A"))
    expected = negotiate_as_acceptor(
        _pynetdicoms(_request("MODALITY_A")).to_primitive().presentation_context_definition_list,
        supported,
    )
    for _ in range(2):
        rq = pdu.to_primitive().presentation_context_definition_list
        results, roles = negotiation.negotiate_as_acceptor(rq, supported)
        assert _contexts(results) == _contexts(expected[0])
        assert roles == expected[1] == []
        assert any(c.result == 0x00 for c in results) and any(c.result != 0x00 for c in results)
        results[0].result = 0x01  # this association's copy only


def test_a_remembered_answer_encodes_as_pynetdicom_encodes_it() -> None:
    supported = build_ae(ListenerSettings()).supported_contexts
    rq = _pynetdicoms(_request("MODALITY_A")).to_primitive()
    results, _ = negotiate_as_acceptor(rq.presentation_context_definition_list, supported)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 131072
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"

    for calling, called in (("MODALITY_A", "PACSAI"), ("MODALITY_B", "PACSAI"), ("X", "Y")):
        answer = A_ASSOCIATE()
        answer.application_context_name = "1.2.840.10008.3.1.1.1"
        answer.calling_ae_title, answer.called_ae_title = calling, called
        answer.result, answer.result_source = 0x00, 0x01
        answer.presentation_context_definition_results_list = results
        answer.user_information = [maximum, implementation]
        assert negotiation.RememberedAC(answer).encode() == A_ASSOCIATE_AC(answer).encode()


# --- through the listener -------------------------------------------------------------------


def test_the_same_proposal_from_each_sender_is_checked_and_recorded_under_its_own_title(
    start_node: StartNode, tmp_path: Path
) -> None:
    def peers(config: NodeConfig) -> None:
        config.listener.peers = [
            PeerSettings.model_validate({"ae_title": a, "address": "127.0.0.1"})
            for a in ("MODALITY_A", "MODALITY_B")
        ]

    node = start_node(peers)
    sent: dict[str, str] = {}
    for sender in ("MODALITY_A", "MODALITY_B", "MODALITY_A"):
        files = small_study(tmp_path / f"in-{len(sent)}", seed=len(sent) + 1, modality="CR")
        result = storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI",
                          calling_aet=sender)  # fmt: skip
        assert result.returncode == 0, result.stderr
        sent[str(pydicom.dcmread(files[0]).SOPInstanceUID)] = sender
    assert len(sent) == 3
    for sop_uid, sender in sent.items():
        record = node.index.instance(sop_uid)
        assert record is not None and record.calling_aet == sender
        assert record.called_aet == "PACSAI"

    # The same proposal from a sender not on the list, or to another called AE title, is refused.
    files = small_study(tmp_path / "stranger", seed=99, modality="CR")
    stranger = storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI",
                        calling_aet="STRANGER")  # fmt: skip
    elsewhere = storescu(files, host="127.0.0.1", port=node.port, called_aet="SOMEONEELSE",
                         calling_aet="MODALITY_A")  # fmt: skip
    for refused in (stranger, elsewhere):
        assert refused.returncode != 0
        assert "Rejected" in refused.stderr + refused.stdout
    assert node.index.instance(str(pydicom.dcmread(files[0]).SOPInstanceUID)) is None
