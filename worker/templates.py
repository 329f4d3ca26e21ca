"""The ``templates/`` folder: where it is, and the typed code map loaded from ``codes.yaml``.

Codes are data (``templates/codes.yaml``), so a site can review or change a code without touching
the SR builder. The file is validated when it is loaded: a missing or unknown key is an error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydicom.sr.coding import Code

TEMPLATES_DIR_ENV = "PACS_AI_TEMPLATES_DIR"
CODES_FILE = "codes.yaml"

# Schemes the SR may use; anything else is a typo that a PACS would show as an unknown code.
KNOWN_SCHEMES = frozenset({"SCT", "DCM", "LN", "UCUM"})


class CodeMapError(ValueError):
    """``codes.yaml`` is missing, malformed or has unknown keys."""


class UnknownFinding(KeyError):
    """A finding name that ``codes.yaml`` does not define."""

    # ``known`` has a default so that the exception survives pickling (Celery sends it back).
    def __init__(self, name: str, known: tuple[str, ...] = ()) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the single argument; say what is known instead.
        defined = ", ".join(self.known) or "other findings"
        return f"unknown finding {self.name!r}; codes.yaml defines {defined}"


@dataclass(frozen=True)
class FindingCode:
    """One finding: its key (as models name it), coded concept and human-readable name."""

    key: str
    code: Code
    display_name: str


@dataclass(frozen=True)
class ProcedureByViews:
    """Procedure Reported code for a chest X-ray exam of at least ``views`` images."""

    views: int
    code: Code


@dataclass(frozen=True)
class CodeMap:
    """The codes the findings SR is built from (see ``templates/codes.yaml``)."""

    findings: Mapping[str, FindingCode]
    present: Code
    absent: Code
    probability_name: Code
    probability_unit: Code
    # Stored NUM value = probability * probability_scale (100 for "%").
    probability_scale: float
    # Sorted by ``views``, ascending.
    procedures: tuple[ProcedureByViews, ...]
    processing_purpose: Code

    def finding_entry(self, name: str) -> FindingCode:
        """The full entry for a finding key; raises :class:`UnknownFinding`."""
        try:
            return self.findings[name]
        except KeyError:
            raise UnknownFinding(name, tuple(self.findings)) from None

    def finding(self, name: str) -> Code:
        """The coded concept of a finding key; raises :class:`UnknownFinding`."""
        return self.finding_entry(name).code

    def finding_key(self, code: Code) -> str:
        """The finding key for a coded concept (as read back from an SR)."""
        for entry in self.findings.values():
            if _same_code(entry.code, code):
                return entry.key
        raise UnknownFinding(f"{code.scheme_designator} {code.value}", tuple(self.findings))

    def presence(self, present: bool) -> Code:
        """The present or absent code."""
        return self.present if present else self.absent

    def procedure_for_views(self, views: int) -> Code:
        """Procedure Reported for a chest X-ray of ``views`` images (the largest entry <= views)."""
        if views < 1:
            raise ValueError(f"a chest X-ray exam has at least one view, got {views}")
        chosen = self.procedures[0]
        for entry in self.procedures:
            if entry.views <= views:
                chosen = entry
        return chosen.code


def _same_code(a: Code, b: Code) -> bool:
    # Compare value and scheme only: a meaning may be spelt differently by another writer.
    return a.value == b.value and a.scheme_designator == b.scheme_designator


def templates_dir() -> Path:
    """The top-level ``templates/`` folder, or ``$PACS_AI_TEMPLATES_DIR`` when set."""
    override = os.environ.get(TEMPLATES_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[1] / "templates"


def code_map(directory: Path | None = None) -> CodeMap:
    """The code map of ``directory`` (default: :func:`templates_dir`), loaded once per path."""
    folder = directory if directory is not None else templates_dir()
    return load_code_map((folder / CODES_FILE).resolve())


@functools.lru_cache(maxsize=8)
def load_code_map(path: Path) -> CodeMap:
    """Load and validate one ``codes.yaml``; cached per path (the result is immutable)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CodeMapError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CodeMapError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return _parse(raw)
    except CodeMapError as exc:
        raise CodeMapError(f"{path}: {exc}") from exc


def _parse(raw: Any) -> CodeMap:
    top = _mapping(
        raw,
        "top level",
        {
            "findings",
            "presence",
            "probability",
            "procedure_reported",
            "contributing_equipment_purpose",
        },
    )

    findings_raw = top["findings"]
    if not isinstance(findings_raw, dict) or not findings_raw:
        raise CodeMapError("findings: expected a non-empty mapping of finding key -> entry")
    findings: dict[str, FindingCode] = {}
    for key, entry_raw in findings_raw.items():
        where = f"findings.{key}"
        entry = _mapping(entry_raw, where, {"code", "display_name"})
        findings[str(key)] = FindingCode(
            key=str(key),
            code=_code(entry["code"], f"{where}.code"),
            display_name=_text(entry["display_name"], f"{where}.display_name"),
        )

    presence = _mapping(top["presence"], "presence", {"present", "absent"})
    probability = _mapping(top["probability"], "probability", {"name", "unit", "scale"})
    scale = probability["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0:
        raise CodeMapError(f"probability.scale: expected a positive number, got {scale!r}")

    procedures_raw = top["procedure_reported"]
    if not isinstance(procedures_raw, list) or not procedures_raw:
        raise CodeMapError("procedure_reported: expected a non-empty list")
    procedures: list[ProcedureByViews] = []
    for index, item_raw in enumerate(procedures_raw):
        where = f"procedure_reported[{index}]"
        item = _mapping(item_raw, where, {"views", "code"})
        views = item["views"]
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise CodeMapError(f"{where}.views: expected an integer >= 1, got {views!r}")
        procedures.append(ProcedureByViews(views=views, code=_code(item["code"], f"{where}.code")))
    procedures.sort(key=lambda p: p.views)
    if procedures[0].views != 1:
        raise CodeMapError("procedure_reported: needs an entry for a single view (views: 1)")
    if len({p.views for p in procedures}) != len(procedures):
        raise CodeMapError("procedure_reported: two entries for the same number of views")

    purpose = _mapping(
        top["contributing_equipment_purpose"],
        "contributing_equipment_purpose",
        {"processing_algorithm"},
    )

    return CodeMap(
        findings=MappingProxyType(findings),
        present=_code(presence["present"], "presence.present"),
        absent=_code(presence["absent"], "presence.absent"),
        probability_name=_code(probability["name"], "probability.name"),
        probability_unit=_code(probability["unit"], "probability.unit"),
        probability_scale=float(scale),
        procedures=tuple(procedures),
        processing_purpose=_code(
            purpose["processing_algorithm"], "contributing_equipment_purpose.processing_algorithm"
        ),
    )


def _mapping(raw: Any, where: str, keys: set[str]) -> dict[str, Any]:
    """A mapping with exactly ``keys``: unknown keys are errors, like everywhere in settings."""
    if not isinstance(raw, dict):
        raise CodeMapError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - keys
    if unknown:
        raise CodeMapError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    missing = keys - set(raw)
    if missing:
        raise CodeMapError(f"{where}: missing keys {sorted(missing)}")
    return raw


def _text(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise CodeMapError(f"{where}: expected a non-empty string, got {raw!r}")
    return raw


def _code(raw: Any, where: str) -> Code:
    entry = _mapping(raw, where, {"value", "scheme", "meaning"})
    # A bare number would lose leading zeros or become a float in YAML: insist on quotes.
    value = entry["value"]
    if not isinstance(value, str) or not value.strip():
        raise CodeMapError(f"{where}.value: expected a quoted string, got {value!r}")
    scheme = _text(entry["scheme"], f"{where}.scheme")
    if scheme not in KNOWN_SCHEMES:
        raise CodeMapError(f"{where}.scheme: {scheme!r} is not one of {sorted(KNOWN_SCHEMES)}")
    meaning = _text(entry["meaning"], f"{where}.meaning")
    # Code Meaning is LO (64 characters) in the Code Sequence Macro.
    if len(meaning) > 64:
        raise CodeMapError(f"{where}.meaning: longer than 64 characters")
    return Code(value=value, scheme_designator=scheme, meaning=meaning)
