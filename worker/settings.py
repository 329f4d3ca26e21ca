"""The settings file: one YAML document with a section per component, plus environment overrides.

Environment variables ``PACS_AI__SECTION__KEY=value`` override the file (the value is parsed as
YAML, so ``PACS_AI__LISTENER__PORT=11113`` is an int). Unknown keys anywhere are an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from dicom_node.settings import (
    CompletionSettings,
    DestinationSettings,
    ImageSettings,
    IndexSettings,
    ListenerSettings,
    QueueSettings,
    RoutingSettings,
    StorageSettings,
    Strict,
)

ENV_PREFIX = "PACS_AI__"
# Pipelines a routing rule may name; a rule naming another one is a settings error.
PIPELINES = ("cxr",)


class ClassifierSettings(Strict):
    """A chest X-ray triage classifier, loaded from a local folder (never from a hub)."""

    # The model folder's format (worker/models/): pacs-ai-cnn (the project's own, the demo),
    # torchxrayvision (DenseNet-121/ResNet-50 weights), torchscript (a torch.jit.save file) or
    # huggingface (a save_pretrained image-classification folder). Every format but pacs-ai-cnn
    # has a pacs-ai.json beside the weights: card, label -> finding map, thresholds, preprocessing.
    adapter: Literal["pacs-ai-cnn", "torchxrayvision", "torchscript", "huggingface"] = "pacs-ai-cnn"
    # Model folder. None: the demo model (pacs-ai-cnn only), built on first use in the data
    # directory.
    path: Path | None = None
    # "auto" picks CUDA when available, else CPU.
    device: str = "auto"
    # Operating points per finding; a finding not listed uses the model's own default.
    thresholds: dict[str, float] = Field(default_factory=dict)
    urgent_findings: list[str] = Field(default_factory=lambda: ["pneumothorax"])
    # Micro-batching when a worker runs several jobs at once (worker.concurrency > 1): images of
    # concurrent studies that arrive within batch_wait_ms share one forward pass.
    batch_max_images: int = Field(default=16, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)


class ModelsSettings(Strict):
    cxr_triage: ClassifierSettings = Field(default_factory=ClassifierSettings)


class WorkerSettings(Strict):
    """One worker process; run several (on several machines) against one broker to scale out."""

    queues: list[str] = Field(default_factory=lambda: ["stat", "routine"])
    concurrency: int = Field(default=1, ge=1)
    # Compressed pixel data is decoded in child processes of the worker, so that a decoder that
    # crashes on a corrupt stream (gdcm aborts on some) costs the image, not the worker. Off
    # only to debug a decoder: then such an image kills the worker.
    isolate_decoding: bool = True
    # A frame not decoded within this long fails its image; the decoder process is replaced.
    decode_timeout_s: float = Field(default=60.0, gt=0)
    # Memory a decoder process may take beyond what it needs to start.
    decoder_memory_mb: int = Field(default=2048, ge=64)


class OutputSettings(Strict):
    """Where results go and how the SR names its author."""

    destinations: list[DestinationSettings] = Field(default_factory=list)
    manufacturer: str = "pacs-ai-worker"
    institution_name: str | None = None
    # The outbox retries an undelivered object with exponential backoff (with jitter) from 1 s up
    # to retry_max_delay_s between attempts, for retry_horizon_s in all; then the row is dead.
    retry_horizon_s: float = Field(default=86400.0, gt=0)
    retry_max_delay_s: float = Field(default=900.0, gt=0)
    # After this many association failures in a row a destination's circuit opens: nobody tries
    # it for circuit_cooldown_s, then one sender probes it with its whole due batch.
    circuit_failures: int = Field(default=5, ge=1)
    circuit_cooldown_s: float = Field(default=60.0, gt=0)
    # How often the dispatcher looks for due rows (a finished job also wakes it at once).
    poll_interval_s: float = Field(default=2.0, gt=0)


class WebhookSettings(Strict):
    """JSON alerts to an HTTP endpoint (for example a paging or messaging gateway)."""

    url: str | None = None
    # HMAC-SHA256 signing key for the X-PACS-AI-Signature header; set it from the environment
    # (PACS_AI__ALERTS__WEBHOOK__SECRET) rather than in the file.
    secret: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)


class Hl7Settings(Strict):
    """HL7 v2 ORU^R01 results over MLLP to the RIS/EMR interface engine."""

    host: str | None = None
    port: int = Field(default=2575, ge=1, le=65535)
    sending_application: str = "PACSAI"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_s: float = Field(default=10.0, gt=0)


class EmailSettings(Strict):
    """E-mail alerts through the hospital's SMTP relay (no patient identifiers in them)."""

    host: str | None = None
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password: str | None = None
    sender: str = "pacs-ai@localhost"
    recipients: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=10.0, gt=0)


class EscalationSettings(Strict):
    """Who hears about an urgent finding nobody acknowledged in time."""

    # Unacknowledged for this long after the alert was raised → the escalation channels fire.
    after_s: float = Field(default=600.0, gt=0)
    # E-mail addresses reached through the e-mail channel's SMTP relay.
    email_recipients: list[str] = Field(default_factory=list)
    webhook_url: str | None = None


class AckSettings(Strict):
    """The HTTP acknowledgement endpoint: a link in every alert that a person opens to acknowledge.

    Off until a secret is set; binds to loopback by default. Each alert's link carries an HMAC of
    the alert id under ``secret``, so only someone who received the alert can acknowledge it.
    """

    # No secret: no endpoint and no links in the alerts.
    secret: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8089, ge=0, le=65535)
    # The address people reach the endpoint at (a reverse proxy, a hostname); default http://host:port.
    base_url: str | None = None
    # A request (line, headers and form) must arrive whole within this long, or the connection
    # is closed: an idle or half-sent request must not hold a thread.
    request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Connections served at once, in all and from one address; more are closed at once.
    max_connections: int = Field(default=32, ge=1, le=1024)
    max_connections_per_address: int = Field(default=8, ge=1, le=1024)


class AlertSettings(Strict):
    """Urgent-finding alerts: every configured channel fires; retries back off until delivered."""

    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    email: EmailSettings = Field(default_factory=EmailSettings)
    escalation: EscalationSettings = Field(default_factory=EscalationSettings)
    ack: AckSettings = Field(default_factory=AckSettings)
    # Backoff between delivery attempts grows from 1 s to this, and never gives up.
    retry_max_delay_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)


class Settings(Strict):
    """The whole settings file."""

    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @model_validator(mode="after")
    def _known_pipelines(self) -> Settings:
        for rule in self.routing.rules:
            if rule.pipeline is not None and rule.pipeline not in PIPELINES:
                raise ValueError(
                    f"routing rule {rule.name!r}: unknown pipeline {rule.pipeline!r} "
                    f"(known: {', '.join(PIPELINES)}; null ignores the study)"
                )
        return self

    @property
    def index_url(self) -> str:
        if self.index.url:
            return self.index.url
        return f"sqlite:///{(self.storage.data_dir / 'index.sqlite3').resolve()}"


class SettingsError(Exception):
    """The settings file or an environment override is invalid; the message says where."""


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SettingsError(f"{name}: {part} is not a section")
            node = child
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate the settings; relative paths resolve against the file's folder."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    _apply_env(data, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path else "environment"
        raise SettingsError(f"invalid settings ({where}):\n{exc}") from exc
    base = path.parent.resolve() if path is not None else Path.cwd()
    if not settings.storage.data_dir.is_absolute():
        settings.storage.data_dir = (base / settings.storage.data_dir).resolve()
    model_path = settings.models.cxr_triage.path
    if model_path is not None and not model_path.is_absolute():
        settings.models.cxr_triage.path = (base / model_path).resolve()
    for tls in [settings.listener.tls, *(d.tls for d in settings.outputs.destinations)]:
        for name in ("cert_file", "key_file", "ca_file"):
            value = getattr(tls, name)
            if value is not None and not value.is_absolute():
                setattr(tls, name, (base / value).resolve())
    return settings


def write_settings(settings: Settings, path: Path) -> None:
    """Write a complete settings file (every option spelled out) that ``load_settings`` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
