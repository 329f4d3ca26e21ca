"""Routing rules: the first matching rule picks the pipeline and the queue; urgent work never waits
behind routine work; a study no rule matches is ignored with a reason an operator can act on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicom_node.index import JobStatus
from dicom_node.node import DicomNode
from dicom_node.routing import StudyHeaders, route_study
from dicom_node.settings import QueueSettings, RouteRule, RoutingSettings
from tests.dicom_node.helpers import small_study
from tests.servers import storescu
from worker.settings import SettingsError, load_settings

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def header(modality: str = "CR", sop_class: str = CR_IMAGE, **attributes: Any) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = f"1.2.3.{len(attributes)}"
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def study(*series: Dataset, calling_aet: str = "WARD", called_aet: str = "PACSAI") -> StudyHeaders:
    return StudyHeaders(
        study_instance_uid="1.2.3",
        series=series or (header(),),
        calling_aets=frozenset([calling_aet]),
        called_aets=frozenset([called_aet]),
    )


def rules(*raw: dict[str, Any]) -> RoutingSettings:
    return RoutingSettings.model_validate({"rules": list(raw)})


DEFAULT = RoutingSettings()


# --- default rules: today's behaviour ------------------------------------------------------------


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_chest_radiographs_go_to_the_cxr_pipeline_on_the_routine_queue(modality: str) -> None:
    route = route_study(study(header(modality)), DEFAULT, QueueSettings())
    assert (route.pipeline, route.queue, route.rule_name) == ("cxr", "routine", "chest-xray")


def test_secondary_capture_that_says_modality_cr_goes_to_the_cxr_pipeline() -> None:
    route = route_study(study(header("CR", SECONDARY_CAPTURE)), DEFAULT, QueueSettings())
    assert route.pipeline == "cxr"


def test_stat_priority_goes_to_the_urgent_queue() -> None:
    route = route_study(study(header(RequestedProcedurePriority="STAT")), DEFAULT, QueueSettings())
    assert (route.queue, route.rule_name) == ("stat", "chest-xray-stat")


def test_stat_inside_the_request_attributes_sequence_goes_to_the_urgent_queue() -> None:
    item = Dataset()
    item.RequestedProcedurePriority = "stat"
    route = route_study(study(header(RequestAttributesSequence=[item])), DEFAULT, QueueSettings())
    assert route.queue == "stat"


def test_er_calling_ae_goes_to_the_urgent_queue() -> None:
    queues = QueueSettings(urgent_calling_aets=["ER_CR1"])
    route = route_study(study(calling_aet="ER_CR1"), DEFAULT, queues)
    assert route.queue == "stat"
    assert "ER_CR1" in route.reason


def test_study_without_a_pipeline_is_ignored_with_the_reason() -> None:
    route = route_study(study(header("MR")), DEFAULT, QueueSettings())
    assert route.pipeline is None and route.rule is None
    # Every rule is named with the condition that failed and the value seen.
    assert "chest-xray-stat: Modality one of [CR, DX] (saw 'MR')" in route.reason
    assert "chest-xray: Modality one of [CR, DX] (saw 'MR')" in route.reason


def test_a_cr_image_beside_other_objects_in_the_study_still_routes_the_study() -> None:
    route = route_study(study(header("SR"), header("CR")), DEFAULT, QueueSettings())
    assert route.pipeline == "cxr"


# --- operators ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "attributes", "matches"),
    [
        (
            {"tag": "StudyDescription", "equals": "CHEST PA"},
            {"StudyDescription": "chest pa "},
            True,
        ),
        (
            {"tag": "StudyDescription", "equals": "CHEST PA", "ignore_case": False},
            {"StudyDescription": "chest pa"},
            False,
        ),
        (
            {"tag": "SeriesDescription", "regex": "flair"},
            {"SeriesDescription": "AX T2 FLAIR"},
            True,
        ),
        (
            {"tag": "SeriesDescription", "regex": "^flair$"},
            {"SeriesDescription": "AX FLAIR"},
            False,
        ),
        ({"tag": "ViewPosition", "one_of": ["PA", "AP"]}, {"ViewPosition": "AP"}, True),
        ({"tag": "ViewPosition", "one_of": ["PA", "AP"]}, {"ViewPosition": "LL"}, False),
        (
            {"tag": "SliceThickness", "range": {"min": 0.5, "max": 3}},
            {"SliceThickness": "1.0"},
            True,
        ),
        ({"tag": "SliceThickness", "range": {"max": 3}}, {"SliceThickness": "5"}, False),
        ({"tag": "Rows", "range": {"min": 2000}}, {"Rows": 2500}, True),
        ({"tag": "SliceThickness", "range": {"min": 0}}, {}, False),
        ({"tag": "ContrastBolusAgent", "exists": True}, {"ContrastBolusAgent": "GD"}, True),
        ({"tag": "ContrastBolusAgent", "exists": True}, {"ContrastBolusAgent": ""}, False),
        ({"tag": "ContrastBolusAgent", "exists": False}, {}, True),
        ({"tag": "(0008,1030)", "equals": "CHEST PA"}, {"StudyDescription": "CHEST PA"}, True),
        ({"tag": "ImageType", "equals": "DERIVED"}, {"ImageType": ["ORIGINAL", "PRIMARY"]}, False),
        ({"tag": "ImageType", "equals": "PRIMARY"}, {"ImageType": ["ORIGINAL", "PRIMARY"]}, True),
        ({"tag": "InstitutionalDepartmentName", "equals": "ER"}, {}, False),
    ],
)
def test_each_condition_operator(
    condition: dict[str, Any], attributes: dict[str, Any], matches: bool
) -> None:
    routing = rules({"name": "r", "when": [condition], "pipeline": "cxr"})
    route = route_study(study(header(**attributes)), routing, QueueSettings())
    assert (route.rule_name == "r") is matches, route.reason


def test_private_tag_given_as_group_and_element_is_matched() -> None:
    ds = header()
    ds.add_new(0x00091010, "LO", "AI-ROUTE")
    ds.add_new(0x00090010, "LO", "SITE")
    routing = rules(
        {"name": "r", "when": [{"tag": "(0009,1010)", "equals": "ai-route"}], "pipeline": "cxr"}
    )
    assert route_study(study(ds), routing, QueueSettings()).rule_name == "r"


def test_calling_and_called_ae_titles_can_route() -> None:
    routing = rules(
        {
            "name": "by-called",
            "when": [{"tag": "called_aet", "equals": "AI_CXR"}],
            "pipeline": "cxr",
        },
        {
            "name": "by-calling",
            "when": [{"tag": "calling_aet", "regex": "^ER_"}],
            "pipeline": "cxr",
            "priority": "urgent",
        },
    )
    queues = QueueSettings()
    assert route_study(study(called_aet="AI_CXR"), routing, queues).rule_name == "by-called"
    route = route_study(study(calling_aet="ER_DX2"), routing, queues)
    assert (route.rule_name, route.queue) == ("by-calling", "stat")
    assert route_study(study(calling_aet="WARD"), routing, queues).pipeline is None


def test_first_matching_rule_wins_and_the_explanation_lists_the_rules_before_it() -> None:
    routing = rules(
        {"name": "dx-only", "when": [{"tag": "Modality", "equals": "DX"}], "pipeline": "cxr"},
        {"name": "any-cr", "when": [{"tag": "Modality", "equals": "CR"}], "pipeline": "cxr"},
        {"name": "catch-all", "pipeline": "cxr", "priority": "urgent"},
    )
    route = route_study(study(header("CR")), routing, QueueSettings())
    assert route.rule_name == "any-cr" and route.queue == "routine"
    assert [o.rule.name for o in route.outcomes] == ["dx-only", "any-cr"]
    assert route.outcomes[0].describe() == "dx-only: Modality equals 'DX' (saw 'CR')"


def test_rule_without_pipeline_ignores_matching_studies_and_says_which_rule() -> None:
    routing = rules(
        {
            "name": "test-modality",
            "when": [{"tag": "calling_aet", "equals": "QA_PHANTOM"}],
            "pipeline": None,
        },
        *[r.model_dump() for r in RoutingSettings().rules],
    )
    route = route_study(study(calling_aet="QA_PHANTOM"), routing, QueueSettings())
    assert route.pipeline is None and route.rule_name == "test-modality"
    assert "test-modality" in route.reason


def test_patient_identifiers_never_appear_in_the_reason() -> None:
    routing = rules(
        {"name": "vip", "when": [{"tag": "PatientName", "equals": "NOBODY"}], "pipeline": "cxr"},
        {"name": "acc", "when": [{"tag": "AccessionNumber", "exists": False}], "pipeline": "cxr"},
    )
    ds = header(PatientName="DOE^JANE", PatientID="P-123", AccessionNumber="ACC777")
    route = route_study(study(ds), routing, QueueSettings())
    assert route.pipeline is None
    for secret in ("DOE", "JANE", "P-123", "ACC777"):
        assert secret not in route.reason
    assert "PatientName equals 'NOBODY' (1 value(s), not shown)" in route.reason


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "complaint"),
    [
        ({"name": "r", "when": [{"tag": "Modalty", "equals": "CR"}], "pipeline": "cxr"}, "Modalty"),
        (
            {
                "name": "r",
                "when": [{"tag": "Modality", "equals": "CR", "regex": "C"}],
                "pipeline": "cxr",
            },
            "exactly one",
        ),
        ({"name": "r", "when": [{"tag": "Modality"}], "pipeline": "cxr"}, "exactly one"),
        (
            {
                "name": "r",
                "when": [{"tag": "SeriesDescription", "regex": "(T1"}],
                "pipeline": "cxr",
            },
            "regular expression",
        ),
        (
            {
                "name": "r",
                "when": [{"tag": "Rows", "range": {"min": 5, "max": 1}}],
                "pipeline": "cxr",
            },
            "above max",
        ),
        ({"name": "r", "when": [{"tag": "Modality", "equal": "CR"}], "pipeline": "cxr"}, "equal"),
        ({"name": "r", "pipeline": "cxr", "priority": "asap"}, "priority"),
    ],
)
def test_invalid_rules_fail_at_load_naming_the_problem(
    rule: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValidationError, match=complaint):
        RoutingSettings.model_validate({"rules": [rule]})


def test_duplicate_rule_names_fail_at_load() -> None:
    with pytest.raises(ValidationError, match="unique"):
        rules({"name": "a", "pipeline": "cxr"}, {"name": "a", "pipeline": "cxr"})


def test_rules_come_from_the_settings_file_and_unknown_pipelines_are_refused(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "routing:\n"
        "  rules:\n"
        "    - name: er-chest\n"
        "      when:\n"
        "        - {tag: Modality, one_of: [CR, DX]}\n"
        "        - {tag: InstitutionalDepartmentName, regex: '^(ER|EMERGENCY)'}\n"
        "      pipeline: cxr\n"
        "      priority: urgent\n"
    )
    settings = load_settings(site, environ={})
    assert [r.name for r in settings.routing.rules] == ["er-chest"]
    route = route_study(
        study(header(InstitutionalDepartmentName="Emergency")), settings.routing, settings.queue
    )
    assert route.queue == "stat"
    site.write_text("routing:\n  rules:\n    - {name: brain, pipeline: brain_mri_v9}\n")
    with pytest.raises(SettingsError, match="unknown pipeline 'brain_mri_v9'"):
        load_settings(site, environ={})


def test_default_rules_are_a_valid_rule_list() -> None:
    assert all(isinstance(r, RouteRule) for r in DEFAULT.rules)
    assert [r.name for r in DEFAULT.rules] == ["chest-xray-stat", "chest-xray"]


# --- through the listener -------------------------------------------------------------------------


def test_stat_request_in_the_header_reaches_the_stat_queue(node: DicomNode, tmp_path: Path) -> None:
    [path] = small_study(tmp_path / "in", kind="pneumothorax", modality="CR")
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.RequestedProcedurePriority = "STAT"
    item.RequestedProcedureID = "RP1"
    item.ScheduledProcedureStepID = "SPS1"
    ds.RequestAttributesSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    assert storescu([path], host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0

    deadline = time.time() + 10
    while time.time() < deadline:
        jobs = node.index.study_jobs(str(ds.StudyInstanceUID))
        if jobs and jobs[0].status == JobStatus.QUEUED:
            break
        time.sleep(0.1)
    [job] = node.index.study_jobs(str(ds.StudyInstanceUID))
    assert job.queue == "stat"
    row = node.index.study(str(ds.StudyInstanceUID))
    assert row is not None and row.route_rule == "chest-xray-stat"
