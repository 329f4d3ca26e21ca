"""Which pipeline a complete study goes to, and with what priority: typed rules, no ``eval``.

Rules (``RoutingSettings`` in the settings file) are tried in order; the first whose conditions all
hold picks the pipeline and the priority. A study no rule matches is ignored, and the reason names
each rule and the condition that failed, with the value seen. Rules read the header of one instance
per series from the spool, at completion time in the assembler, never in the C-STORE handler.
``explain`` keeps every rule's outcome so ``pacs-ai route explain`` can show the whole decision.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from dicom_node.index import InstanceRecord
from dicom_node.settings import (
    AnyOf,
    Condition,
    QueueSettings,
    RouteRule,
    RoutingSettings,
    SeriesRequirement,
    parse_tag_path,
)

log = logging.getLogger(__name__)

# Values of these are never written into reasons (they reach the index and the logs).
_PATIENT_GROUPS = frozenset({0x0010, 0x0038})
_ACCESSION_NUMBER = 0x00080050
_TEXT_VRS = frozenset({"UN", "LO", "SH", "CS", "LT", "ST", "UT", "UC", "PN", "DS", "IS"})
_MAX_VALUES_SHOWN = 4


@dataclass(frozen=True)
class StudyHeaders:
    """What the rules look at: one header per series, plus the AE titles the study came through."""

    study_instance_uid: str
    series: tuple[Dataset, ...]
    calling_aets: frozenset[str] = frozenset()
    called_aets: frozenset[str] = frozenset()
    instance_count: int = 0
    # Series whose files could not be read: routed on the index's own columns instead.
    unreadable: int = 0


@dataclass(frozen=True)
class ConditionResult:
    """One condition tested against a study: whether it held and the values it saw."""

    condition: Condition | AnyOf
    holds: bool
    seen: tuple[str, ...]
    parts: tuple[ConditionResult, ...] = ()

    def describe(self, *, redact: bool = True) -> str:
        if isinstance(self.condition, AnyOf):
            inner = " or ".join(part.describe(redact=redact) for part in self.parts)
            return f"any of ({inner})"
        return f"{_describe(self.condition)} {_seen(self.condition, self.seen, redact)}"


@dataclass(frozen=True)
class RuleOutcome:
    """How one rule fared: the conditions tested up to the first that failed, and missing series."""

    rule: RouteRule
    matched: bool
    results: tuple[ConditionResult, ...]
    missing_series: tuple[str, ...] = ()

    @property
    def failed(self) -> ConditionResult | None:
        return next((r for r in self.results if not r.holds), None)

    def detail(self, *, redact: bool = True) -> str:
        """The condition that failed, or every condition that held."""
        failed = self.failed
        if failed is not None:
            return failed.describe(redact=redact)
        return "; ".join(r.describe(redact=redact) for r in self.results) or "no conditions"

    def describe(self, *, redact: bool = True) -> str:
        return f"{self.rule.name}: {self.detail(redact=redact)}"


@dataclass(frozen=True)
class Route:
    """The decision for one study: a rule, pipeline and queue, or why it is ignored."""

    pipeline: str | None
    queue: str
    reason: str
    rule: RouteRule | None = None
    priority: str = "routine"
    # Required series the matched rule names and the study lacks.
    missing_series: tuple[str, ...] = ()
    outcomes: tuple[RuleOutcome, ...] = field(default=(), repr=False)
    # Why the study went to the urgent queue although its rule says routine.
    urgent_because: str | None = None

    @property
    def rule_name(self) -> str | None:
        return self.rule.name if self.rule is not None else None


# --- reading headers -------------------------------------------------------------------------


def _fallback_header(record: InstanceRecord) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = record.study_instance_uid
    ds.SeriesInstanceUID = record.series_instance_uid
    ds.SOPClassUID = record.sop_class_uid
    ds.SOPInstanceUID = record.sop_instance_uid
    ds.Modality = record.modality
    return ds


def read_study_headers(records: Sequence[InstanceRecord]) -> StudyHeaders:
    """The headers of a study's instances in the spool: the first readable one of each series."""
    by_series: dict[str, list[InstanceRecord]] = {}
    for record in records:
        by_series.setdefault(record.series_instance_uid, []).append(record)
    headers: list[Dataset] = []
    unreadable = 0
    for series_records in by_series.values():
        for record in series_records:
            try:
                headers.append(dcmread(record.path, stop_before_pixels=True))
                break
            except (OSError, InvalidDicomError, ValueError) as exc:
                log.warning(
                    "cannot read the header of instance %s for routing: %s",
                    record.sop_instance_uid,
                    type(exc).__name__,
                )
        else:
            unreadable += 1
            headers.append(_fallback_header(series_records[0]))
    return StudyHeaders(
        study_instance_uid=records[0].study_instance_uid if records else "",
        series=tuple(headers),
        calling_aets=frozenset(r.calling_aet for r in records if r.calling_aet),
        called_aets=frozenset(r.called_aet for r in records if r.called_aet),
        instance_count=len(records),
        unreadable=unreadable,
    )


def headers_from_files(
    paths: Iterable[Path], *, calling_aet: str | None = None, called_aet: str | None = None
) -> tuple[list[StudyHeaders], list[tuple[Path, str]]]:
    """Group DICOM files by study (one header per series); also return the files skipped and why."""
    studies: dict[str, dict[str, Dataset]] = {}
    counts: dict[str, int] = {}
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError) as exc:
            skipped.append((path, f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        if not study_uid:
            skipped.append((path, "no StudyInstanceUID"))
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        studies.setdefault(study_uid, {}).setdefault(series_uid, ds)
        counts[study_uid] = counts.get(study_uid, 0) + 1
    result = [
        StudyHeaders(
            study_instance_uid=uid,
            series=tuple(series.values()),
            calling_aets=frozenset([calling_aet] if calling_aet else []),
            called_aets=frozenset([called_aet] if called_aet else []),
            instance_count=counts[uid],
        )
        for uid, series in studies.items()
    ]
    return result, skipped


# --- evaluating conditions -------------------------------------------------------------------


def _element_values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if elem.VR == "SQ":
        return ["<item>"] * len(value)
    if isinstance(value, bytes):
        if elem.VR not in _TEXT_VRS:
            return [f"<{len(value)} bytes>"]
        value = value.decode("latin-1").strip("\x00 ")
        return [v.strip() for v in value.split("\\") if v.strip()]
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [text for item in items if (text := str(item).strip())]


def _values_at(ds: Dataset, tags: tuple[int, ...]) -> list[str]:
    if tags[0] not in ds:
        return []
    elem = ds[tags[0]]
    if len(tags) == 1:
        return _element_values(elem)
    if elem.VR != "SQ" or not elem.value:
        return []
    values: list[str] = []
    for item in elem.value:
        values += _values_at(item, tags[1:])
    return values


def study_values(
    tag: str, series: Sequence[Dataset], calling: Iterable[str], called: Iterable[str]
) -> list[str]:
    """Every value the study shows for ``tag``: over all series headers, values and items."""
    if tag == "calling_aet":
        return sorted(calling)
    if tag == "called_aet":
        return sorted(called)
    tags = parse_tag_path(tag)
    values: list[str] = []
    for ds in series:
        for value in _values_at(ds, tags):
            if value not in values:
                values.append(value)
    return values


def _norm(text: str, ignore_case: bool) -> str:
    text = text.strip()
    return text.casefold() if ignore_case else text


def _holds(condition: Condition, values: Sequence[str]) -> bool:
    if condition.exists is not None:
        return bool(values) == condition.exists
    ic = condition.ignore_case
    if condition.equals is not None:
        wanted = _norm(condition.equals, ic)
        return any(_norm(v, ic) == wanted for v in values)
    if condition.one_of is not None:
        allowed = {_norm(x, ic) for x in condition.one_of}
        return any(_norm(v, ic) in allowed for v in values)
    if condition.regex is not None:
        pattern = re.compile(condition.regex, re.IGNORECASE if ic else 0)
        return any(pattern.search(v) for v in values)
    if condition.range is not None:
        low, high = condition.range.min, condition.range.max
        for v in values:
            try:
                number = float(v)
            except ValueError:
                continue
            if (low is None or number >= low) and (high is None or number <= high):
                return True
        return False
    raise AssertionError("a validated condition has an operator")


def evaluate(
    condition: Condition | AnyOf,
    series: Sequence[Dataset],
    calling: Iterable[str] = (),
    called: Iterable[str] = (),
) -> ConditionResult:
    """Test one condition (or any-of group) against the given series headers."""
    calling, called = tuple(calling), tuple(called)
    if isinstance(condition, AnyOf):
        parts = tuple(evaluate(c, series, calling, called) for c in condition.any_of)
        return ConditionResult(condition, any(p.holds for p in parts), (), parts)
    values = study_values(condition.tag, series, calling, called)
    return ConditionResult(condition, _holds(condition, values), tuple(values))


def _describe(condition: Condition) -> str:
    if condition.exists is not None:
        return f"{condition.tag} {'exists' if condition.exists else 'missing'}"
    if condition.equals is not None:
        return f"{condition.tag} equals {condition.equals!r}"
    if condition.one_of is not None:
        return f"{condition.tag} one of [{', '.join(condition.one_of)}]"
    if condition.regex is not None:
        return f"{condition.tag} matches /{condition.regex}/"
    assert condition.range is not None
    low, high = condition.range.min, condition.range.max
    if low is None:
        return f"{condition.tag} at most {high:g}"
    if high is None:
        return f"{condition.tag} at least {low:g}"
    return f"{condition.tag} between {low:g} and {high:g}"


def _is_patient_data(tag: str) -> bool:
    if tag in ("calling_aet", "called_aet"):
        return False
    last = parse_tag_path(tag)[-1]
    if last >> 16 in _PATIENT_GROUPS or last == _ACCESSION_NUMBER:
        return True
    try:
        return dictionary_VR(last) == "PN"
    except KeyError:
        return False


def _seen(condition: Condition, seen: Sequence[str], redact: bool) -> str:
    if not seen:
        return "(not present)"
    if redact and _is_patient_data(condition.tag):
        return f"({len(seen)} value(s), not shown)"
    shown = ", ".join(repr(v) for v in seen[:_MAX_VALUES_SHOWN])
    more = f" and {len(seen) - _MAX_VALUES_SHOWN} more" if len(seen) > _MAX_VALUES_SHOWN else ""
    return f"(saw {shown}{more})"


def _series_present(requirement: SeriesRequirement, study: StudyHeaders) -> bool:
    return any(
        all(
            evaluate(c, [ds], study.calling_aets, study.called_aets).holds for c in requirement.when
        )
        for ds in study.series
    )


def _try_rule(rule: RouteRule, study: StudyHeaders) -> RuleOutcome:
    results: list[ConditionResult] = []
    for condition in rule.when:
        result = evaluate(condition, study.series, study.calling_aets, study.called_aets)
        results.append(result)
        if not result.holds:
            return RuleOutcome(rule, False, tuple(results))
    missing = tuple(r.name for r in rule.require_series if not _series_present(r, study))
    return RuleOutcome(rule, True, tuple(results), missing)


# --- the decision ----------------------------------------------------------------------------


def route_study(study: StudyHeaders, routing: RoutingSettings, queues: QueueSettings) -> Route:
    """Decide the rule, pipeline and queue for a complete study (first matching rule wins)."""
    outcomes: list[RuleOutcome] = []
    for rule in routing.rules:
        outcome = _try_rule(rule, study)
        outcomes.append(outcome)
        if outcome.matched:
            break
    else:
        tried = "; ".join(o.describe() for o in outcomes)
        reason = f"no routing rule matched ({tried})" if tried else "no routing rules configured"
        return Route(None, queues.routine_queue, reason, outcomes=tuple(outcomes))
    matched = outcomes[-1]
    rule = matched.rule
    reason = f"rule {matched.describe()}"
    if rule.pipeline is None:
        return Route(
            None,
            queues.routine_queue,
            f"{reason} (the rule ignores matching studies)",
            rule,
            outcomes=tuple(outcomes),
        )
    priority = rule.priority
    urgent_because = None
    urgent_aets = sorted(study.calling_aets & set(queues.urgent_calling_aets))
    if urgent_aets and priority != "urgent":
        priority = "urgent"
        urgent_because = f"calling AE {', '.join(urgent_aets)} is in queue.urgent_calling_aets"
        reason += f"; urgent: {urgent_because}"
    queue = queues.urgent_queue if priority == "urgent" else queues.routine_queue
    return Route(
        rule.pipeline,
        queue,
        f"{reason} → {rule.pipeline} ({priority})",
        rule,
        priority,
        matched.missing_series,
        tuple(outcomes),
        urgent_because,
    )
