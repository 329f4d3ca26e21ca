"""``pacs-ai``: the command line for radiology IT, ML engineers and validation leads."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from worker.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from dicom_node.settings import DestinationTLSSettings

DESCRIPTION = """\
pacs-ai-worker: a clinical AI node beside your PACS.

Studies arrive by DICOM C-STORE, AI models read them, and the results go back to the PACS as
DICOM Structured Reports; urgent findings (pneumothorax first) raise alerts.

Start here:
  pacs-ai demo                         everything on this machine with synthetic and real studies
  pacs-ai serve --config site.yaml     listener, embedded broker and workers for real use
  pacs-ai echo PACSAI@127.0.0.1:11112  check that a DICOM node answers
"""

EPILOG = """\
Settings: one YAML file (see deploy/site.example.yaml); environment variables
PACS_AI__SECTION__KEY=value override it, e.g. PACS_AI__LISTENER__PORT=11113.
Demo models are labelled DEMO / NOT FOR CLINICAL USE in every output.
"""


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except SettingsError as exc:
        raise SystemExit(str(exc)) from exc


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        metavar="FILE",
        help="settings YAML file (default: built-in safe defaults plus PACS_AI__* variables)",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo.run import run_demo

    return run_demo(args.workdir, include_real=not args.no_real, real_dir=args.real_dir)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.logs import configure_logging
    from worker.service import run_serve

    configure_logging(args.log_level)
    return run_serve(_settings(args), args.config)


def cmd_node(args: argparse.Namespace) -> int:
    from dicom_node.logs import configure_logging
    from worker.service import run_node

    configure_logging(args.log_level)
    return run_node(_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.logs import configure_logging
    from worker.service import run_worker

    configure_logging(args.log_level)
    settings = _settings(args)
    queues = [q for q in (args.queues or ",".join(settings.worker.queues)).split(",") if q]
    return run_worker(settings, queues, args.concurrency or settings.worker.concurrency)


def _local_listener(settings: Settings) -> str:
    host = (
        "127.0.0.1" if settings.listener.host in ("0.0.0.0", "::", "") else settings.listener.host
    )
    return f"{settings.listener.ae_title}@{host}:{settings.listener.port}"


def _tls(args: argparse.Namespace) -> DestinationTLSSettings | None:
    """DICOM TLS for echo/send from ``--tls``, ``--ca``, ``--cert``/``--key``, ``--no-check-hostname``."""
    from dicom_node.settings import DestinationTLSSettings

    if not (args.tls or args.ca or args.cert or args.key):
        return None
    return DestinationTLSSettings(
        enabled=True,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        check_hostname=args.check_hostname,
    )


def _add_tls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOM TLS (any of these turns it on)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system trust store)")
    g.add_argument("--ca", type=Path, metavar="PEM", help="CA certificates to verify the node")
    g.add_argument("--cert", type=Path, metavar="PEM", help="our client certificate (mutual TLS)")
    g.add_argument("--key", type=Path, metavar="PEM", help="the key of --cert")
    g.add_argument(
        "--no-check-hostname",
        dest="check_hostname",
        action="store_false",
        help="accept a certificate that names neither the host nor its address",
    )


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.errors import DestinationUnavailable
    from dicom_node.scu import RemoteNode, echo

    settings = _settings(args)
    address = args.address or _local_listener(settings)
    remote = replace(RemoteNode.parse(address, args.aet), tls=_tls(args))
    try:
        status = echo(remote)
    except DestinationUnavailable as exc:
        print(f"C-ECHO {remote}: FAILED — {exc}", file=sys.stderr)
        return 2
    print(f"C-ECHO {remote}: status 0x{status:04X} ({'success' if status == 0 else 'failure'})")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.errors import DestinationRejected, DestinationUnavailable
    from dicom_node.scu import RemoteNode, send_files

    files: list[Path] = []
    for path in args.paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        print("nothing to send", file=sys.stderr)
        return 2
    remote = replace(RemoteNode.parse(args.to, args.aet), tls=_tls(args))
    try:
        statuses = send_files(remote, files)
    except (DestinationUnavailable, DestinationRejected) as exc:
        print(f"C-STORE to {remote}: FAILED — {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # unreadable file: say which kind of problem
        print(f"cannot send: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"C-STORE to {remote}: {len(statuses)} instance(s) stored")
    return 0


def _shown(value: object) -> str:
    """Text from the index or a file as the terminal should show it: control characters escaped.

    What a sender, a webhook receiver or a person at the acknowledgement link wrote (an AE
    title, an error, a name) must not move the cursor, recolour or retitle the operator's
    terminal, nor turn text around (Unicode format characters such as U+202E). Line breaks and
    tabs of multi-line errors stay.
    """
    text = str(value)
    return "".join(
        c
        if c in _KEPT or not unicodedata.category(c).startswith(("C", "Zl", "Zp"))
        else _escaped(c)
        for c in text
    )


_KEPT = frozenset("\n\t ")


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_studies(args: argparse.Namespace) -> int:
    from dicom_node.index import Index

    index = Index(_settings(args).index_url)
    rows = index.list_studies(limit=args.limit)
    print(
        f"{'last received':19}  {'status':10} {'mod':4} {'n':>4} {'urgent':6}  study / reason / job"
    )
    for s in rows:
        print(
            f"{_when(s.last_received_at):19}  {s.status.value:10} {s.modality:4} "
            f"{s.instance_count:>4} {'yes' if s.urgent else '':6}  {s.study_instance_uid}"
            + (f"\n{'':49}{_shown(s.reason)}" if s.reason else "")
        )
        jobs = index.study_jobs(s.study_instance_uid)
        if jobs:
            # The latest run: why a study sits in queued or failed is in its job, not the study.
            job = jobs[-1]
            tries = f", {job.attempts} attempt{'s' if job.attempts != 1 else ''}"
            print(
                f"{'':49}job {job.pipeline} {job.status.value}{tries if job.attempts else ''}"
                + (f": {_shown(job.error)}" if job.error else "")
            )
    index.close()
    return 0


def cmd_alerts_list(args: argparse.Namespace) -> int:
    from dicom_node.index import Index

    index = Index(_settings(args).index_url)
    rows = index.list_alerts(limit=args.limit)
    if not rows:
        print("no alerts")
    print(
        f"{'id':>5}  {'raised':19}  {'finding':16} {'p':>5}  {'channel':18} {'status':9} {'tries':>5}  acknowledged"
    )
    for a in rows:
        ack = (
            f"{_when(a['acknowledged_at'])} by {_shown(a['acknowledged_by'])}"
            if a["acknowledged_at"]
            else "NO"
        )
        print(
            f"{a['id']:>5}  {_when(a['created_at']):19}  {a['finding']:16} {a['probability']:>5.2f}  "
            f"{a['channel']:18} {a['status']:9} {a['attempts']:>5}  {ack}"
        )
        print(
            f"{'':7}study {a['study_instance_uid']}"
            + (f"\n{'':7}last error: {_shown(a['last_error'])}" if a["last_error"] else "")
        )
    index.close()
    return 0


def cmd_alerts_ack(args: argparse.Namespace) -> int:
    import time

    from dicom_node.index import Index

    index = Index(_settings(args).index_url)
    count = index.acknowledge_alert(args.id, args.by, time.time())
    index.close()
    if count == 0:
        print(f"alert {args.id}: unknown or already acknowledged", file=sys.stderr)
        return 2
    print(f"alert {args.id} acknowledged by {args.by} ({count} channel row(s); no escalation)")
    return 0


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from dicom_node.index import DeliveryStatus, Index

    index = Index(_settings(args).index_url)
    state = DeliveryStatus(args.state) if args.state else None
    rows = index.list_deliveries(state, limit=args.limit)
    index.close()
    if not rows:
        print("outbox is empty" if state is None else f"no {state.value} deliveries")
        return 0
    print(
        f"{'id':>6}  {'created':19}  {'state':9} {'tries':>5}  {'destination':16} {'kind':12} next"
    )
    for d in rows:
        if d["status"] == DeliveryStatus.PENDING:
            nxt = _when(d["next_attempt_at"])
        elif d["status"] == DeliveryStatus.DELIVERED:
            nxt = f"delivered {_when(d['delivered_at'])}"
        elif d["status"] == DeliveryStatus.COMMITTING:
            nxt = f"commitment report due by {_when(d['next_attempt_at'])}"
        else:
            nxt = f"dead since {_when(d['dead_at'])}"
        print(
            f"{d['id']:>6}  {_when(d['created_at']):19}  {d['status']:9} {d['attempts']:>5}  "
            f"{d['destination']:16} {d['kind'] or '?':12} {nxt}"
        )
        print(f"{'':8}object {d['sop_instance_uid']} of study {d['study_instance_uid'] or '?'}")
        if d["last_status"] is not None:
            print(f"{'':8}last status: 0x{d['last_status']:04X}")
        if d["last_error"]:
            print(f"{'':8}last error: {_shown(d['last_error'])}")
    return 0


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    import time

    from dicom_node.index import Index

    if not args.ids and not args.dead:
        print("name delivery ids or --dead", file=sys.stderr)
        return 2
    index = Index(_settings(args).index_url)
    count = index.retry_deliveries(time.time(), ids=args.ids, all_dead=args.dead)
    index.close()
    if count == 0:
        print("nothing to retry (unknown ids, or already delivered)", file=sys.stderr)
        return 2
    print(f"{count} delivery(ies) due now with a fresh retry horizon; a running worker sends them")
    return 0


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    import time

    from dicom_node.index import Index

    if not args.dead:
        print("only dead deliveries can be purged: add --dead", file=sys.stderr)
        return 2
    cutoff = time.time() - args.older_than * 86400 if args.older_than is not None else None
    index = Index(_settings(args).index_url)
    count = index.purge_dead_deliveries(cutoff)
    index.close()
    print(f"{count} dead delivery(ies) purged")
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from dicom_node.index import Index

    index = Index(_settings(args).index_url)
    rows = index.list_quarantine(limit=args.limit)
    if not rows:
        print("quarantine is empty")
    for q in rows:
        print(
            f"{_when(q.received_at)}  0x{q.status_code:04X}  from {_shown(q.calling_aet):16} {q.id}"
        )
        print(f"    reason: {_shown(q.reason)}\n    kept in: {q.path}")
    index.close()
    return 0


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    from dicom_node.index import Index
    from dicom_node.quarantine import describe

    index = Index(_settings(args).index_url)
    entry = index.quarantine_entry(args.id)
    index.close()
    if entry is None:
        print(f"no quarantine entry {args.id}", file=sys.stderr)
        return 2
    print(f"entry:        {entry.id}")
    print(f"received:     {_when(entry.received_at)} from {_shown(entry.calling_aet)}")
    print(f"answered:     0x{entry.status_code:04X}")
    print(f"reason:       {_shown(entry.reason)}")
    print(f"kept in:      {entry.path}")
    for key, value in describe(Path(entry.path)).items():
        print(f"{key + ':':14}{_shown(value)}")
    return 0


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    from dicom_node.node import build_storage_scp
    from dicom_node.quarantine import retry
    from worker.service import node_config

    settings = _settings(args)
    scp = build_storage_scp(node_config(settings, settings.queue.broker_url))
    try:
        entry = scp.index.quarantine_entry(args.id)
        if entry is None:
            print(f"no quarantine entry {args.id}", file=sys.stderr)
            return 2
        outcome = retry(scp, entry)
    finally:
        scp.index.close()
    if outcome.stored:
        print(f"{args.id}: stored; the study completes as if the instance had just arrived")
        return 0
    print(f"{args.id}: still refused (0x{outcome.status_code:04X}): {_shown(outcome.reason)}")
    return 1


def cmd_reindex(args: argparse.Namespace) -> int:
    from dicom_node.logs import configure_logging
    from dicom_node.node import build_storage_scp
    from dicom_node.recovery import reindex_spool
    from worker.service import node_config

    configure_logging("INFO")
    settings = _settings(args)
    scp = build_storage_scp(node_config(settings, settings.queue.broker_url))
    try:
        result = reindex_spool(scp, since=0.0)
    finally:
        scp.index.close()
    print(
        f"{result.files} instance file(s) in {result.folders} series folder(s): "
        f"{result.indexed} indexed, {result.refused} refused (left in place, see the log above)"
    )
    return 1 if result.refused else 0


def cmd_build_demo_model(args: argparse.Namespace) -> int:
    from worker.demo.train import train_demo_model

    out = train_demo_model(args.out, seed=args.seed, progress=print)
    print(f"demo model written to {out} (DEMO / NOT FOR CLINICAL USE)")
    return 0


def cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    from worker.evaluation import (
        EvaluationError,
        evaluate_classifier,
        format_table,
        write_csv,
        write_json,
    )
    from worker.imaging.isolated import IsolatedDecoder
    from worker.models import ModelLoadError, load_classifier

    settings = _settings(args)
    triage = settings.models.cxr_triage
    for name in ("target_sensitivity", "target_ppv"):
        value = getattr(args, name)
        if value is not None and not 0.0 < value <= 1.0:
            print(f"--{name.replace('_', '-')} must lie in (0, 1]", file=sys.stderr)
            return 2

    def progress(message: str) -> None:
        print(f"[evaluate] {message}", file=sys.stderr, flush=True)

    try:
        # The worker's demo model folder (worker.context.WorkerContext.demo_model_dir).
        classifier = load_classifier(
            triage, demo_dir=settings.storage.data_dir / "models" / "demo-cxr"
        )
        # Whatever the folder holds is decoded as the worker decodes it: a corrupt image costs
        # that image, not the whole run.
        decoder = IsolatedDecoder(
            settings.worker.decode_timeout_s, settings.worker.decoder_memory_mb
        )
        try:
            evaluation = evaluate_classifier(
                classifier,
                args.data,
                args.labels,
                triage.thresholds,
                target_sensitivity=args.target_sensitivity,
                target_ppv=args.target_ppv,
                bootstrap=args.bootstrap,
                seed=args.seed,
                progress=None if args.quiet else progress,
                decoder=decoder,
            )
        finally:
            decoder.close()
    except (ModelLoadError, EvaluationError) as exc:
        print(f"cannot evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_table(evaluation))
    if args.json:
        write_json(evaluation, args.json)
        print(f"JSON written to {args.json}")
    if args.csv:
        write_csv(evaluation, args.csv)
        print(f"CSV written to {args.csv}")
    return 0


def _dicom_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def cmd_route_explain(args: argparse.Namespace) -> int:
    from dicom_node.routing import headers_from_files, route_study

    settings = _settings(args)
    studies, skipped = headers_from_files(
        _dicom_files(args.paths), calling_aet=args.calling_aet, called_aet=args.called_aet
    )
    for path, why in skipped:
        print(f"skipped {path}: {_shown(why)}")
    if not studies:
        print("no DICOM study found", file=sys.stderr)
        return 2
    for study in studies:
        route = route_study(study, settings.routing, settings.queue)
        modalities = sorted({str(ds.get("Modality", "") or "?") for ds in study.series})
        print(
            f"study {study.study_instance_uid}: {study.instance_count} instance(s) in "
            f"{len(study.series)} series, modality {', '.join(modalities)}"
        )
        print(
            f"  calling AE {args.calling_aet or '(not given: --calling-aet)'}, "
            f"called AE {args.called_aet or '(not given: --called-aet)'}"
        )
        tried = {o.rule.name: o for o in route.outcomes}
        for number, rule in enumerate(settings.routing.rules, start=1):
            outcome = tried.get(rule.name)
            if outcome is None:
                print(f"  {number}. {rule.name}: not tried (an earlier rule matched)")
                continue
            verdict = "MATCH" if outcome.matched else "no match"
            print(f"  {number}. {rule.name}: {verdict} — {_shown(outcome.detail())}")
            for requirement in rule.require_series if outcome.matched else []:
                state = "MISSING" if requirement.name in outcome.missing_series else "present"
                print(f"       required series {requirement.name}: {state}")
        if route.rule is None:
            print("  → ignored: no rule matched")
        elif route.pipeline is None:
            print(f"  → ignored by rule {route.rule.name}")
        else:
            print(f"  → pipeline {route.pipeline}, priority {route.priority}, queue {route.queue}")
            if route.missing_series:
                then = (
                    "then marked incomplete"
                    if route.rule.when_series_missing == "incomplete"
                    else "then run with what it has"
                )
                print(
                    f"    but waits up to {route.rule.series_wait_s:g} s for "
                    f"{', '.join(route.missing_series)}, {then}"
                )
        if route.urgent_because:
            print(f"    urgent because {route.urgent_because}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-ai",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "demo",
        help="run the one-command demo (synthetic and real studies in, SRs and alerts out)",
        description=(
            "Start the listener, an embedded broker, a worker, a small receiving PACS and a webhook\n"
            "sink on loopback; send synthetic chest X-ray studies (a pneumothorax phantom, a normal\n"
            "one, ...) and the real SIIM file when present; print a table per study.\n"
            "Exit code 0 only if every study produced a delivered SR."
        ),
        formatter_class=raw,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("pacs-ai-demo"),
        help="working folder (default: ./pacs-ai-demo)",
    )
    p.add_argument("--no-real", action="store_true", help="send only synthetic studies")
    p.add_argument(
        "--real-dir",
        type=Path,
        default=None,
        help="folder with real DICOM test files (default: ../shared/data/real next to the checkout)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "serve",
        help="run listener, broker (embedded if configured) and workers on this machine",
        description="Run every component on this machine until SIGINT/SIGTERM; restart workers that die.",
    )
    _add_config(p)
    p.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "node",
        help="run only the DICOM listener and study assembler (needs a Redis broker URL)",
        description="Run the C-STORE/C-ECHO listener and the study assembler; jobs go to the broker.",
    )
    _add_config(p)
    p.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    p.set_defaults(func=cmd_node)

    p = sub.add_parser(
        "worker",
        help="run one model worker on the given queues (needs a Redis broker URL)",
        description=(
            "Run a worker process. Several workers on several machines can share one broker;\n"
            "reserve workers for urgent work with --queues stat."
        ),
        formatter_class=raw,
    )
    _add_config(p)
    p.add_argument(
        "--queues",
        "-Q",
        default=None,
        help="comma-separated queues (default: worker.queues, i.e. stat,routine)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs at once in this process (default: worker.concurrency)",
    )
    p.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("echo", help="C-ECHO a DICOM node (default: this node's listener)")
    _add_config(p)
    p.add_argument(
        "address", nargs="?", default=None, help="AE@HOST:PORT (default: the configured listener)"
    )
    p.add_argument("--aet", default="PACSAI", help="our calling AE title (default PACSAI)")
    _add_tls(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", help="C-STORE DICOM files or folders to a node")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the receiving node")
    p.add_argument("--aet", default="PACSAI", help="our calling AE title (default PACSAI)")
    _add_tls(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("studies", help="list recent studies and their status from the index")
    _add_config(p)
    p.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser(
        "alerts", help="urgent-finding alerts: delivery per channel, acknowledgement"
    )
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = asub.add_parser("list", help="recent alerts with their delivery and acknowledgement")
    _add_config(a)
    a.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    a.set_defaults(func=cmd_alerts_list)
    a = asub.add_parser(
        "ack", help="acknowledge an alert (all its channels): it will not be escalated"
    )
    _add_config(a)
    a.add_argument("id", type=int, help="alert id (from 'pacs-ai alerts list' or the alert itself)")
    a.add_argument("--by", required=True, help="who acknowledges (name or user id, for the record)")
    a.set_defaults(func=cmd_alerts_ack)

    p = sub.add_parser(
        "outbox",
        help="SRs on their way to the PACS: list, retry dead letters, purge",
        description=(
            "Every output goes to every destination through a row in the index: pending (retried\n"
            "with backoff up to outputs.retry_horizon_s), delivered, or dead (refused by the\n"
            "destination, or retries gave up). Dead rows wait for an operator."
        ),
        formatter_class=raw,
    )
    osub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    o = osub.add_parser("list", help="deliveries, newest first, with state, tries and last error")
    _add_config(o)
    o.add_argument(
        "--state",
        choices=["pending", "committing", "delivered", "dead"],
        default=None,
        help="only rows in this state (default: all)",
    )
    o.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    o.set_defaults(func=cmd_outbox_list)
    o = osub.add_parser("retry", help="send dead (or waiting) deliveries again now")
    _add_config(o)
    o.add_argument("ids", type=int, nargs="*", help="delivery ids (from 'pacs-ai outbox list')")
    o.add_argument("--dead", action="store_true", help="every dead delivery")
    o.set_defaults(func=cmd_outbox_retry)
    o = osub.add_parser("purge", help="delete dead deliveries from the index")
    _add_config(o)
    o.add_argument("--dead", action="store_true", help="required: purge dead deliveries")
    o.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="only those dead for more than DAYS days (default: all dead)",
    )
    o.set_defaults(func=cmd_outbox_purge)

    p = sub.add_parser("quarantine", help="inspect input that was refused and kept aside")
    qsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = qsub.add_parser("list", help="list quarantined input with the reason")
    _add_config(q)
    q.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    q.set_defaults(func=cmd_quarantine_list)
    q = qsub.add_parser("show", help="one entry: why it was refused and what the file is")
    _add_config(q)
    q.add_argument("id", help="entry id (from 'pacs-ai quarantine list')")
    q.set_defaults(func=cmd_quarantine_show)
    q = qsub.add_parser(
        "retry",
        help="run an entry through the listener's checks again (after fixing the cause)",
        description="Exit 0: stored; 1: still refused (new reason recorded); 2: unknown entry.",
    )
    _add_config(q)
    q.add_argument("id", help="entry id (from 'pacs-ai quarantine list')")
    q.set_defaults(func=cmd_quarantine_retry)

    p = sub.add_parser(
        "reindex",
        help="index the spool's instance files that the index does not know",
        description=(
            "Index every instance file in the spool that the index does not know, through the\n"
            "listener's own checks; their studies then complete, or run again, as for a late\n"
            "instance. For an index restored from a backup older than the spool, or replaced.\n"
            "The node does this by itself, for recently changed series folders, at its first\n"
            "start after the machine booted (a power loss can take the last index rows, never\n"
            "the files). Safe while the node runs. Exit 1 if a file was refused."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(p)
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = msub.add_parser(
        "build-demo",
        help="train the demo triage model on synthetic phantoms (DEMO / NOT FOR CLINICAL USE)",
    )
    m.add_argument("--out", type=Path, required=True, help="model folder to write")
    m.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    m.set_defaults(func=cmd_build_demo_model)

    p = sub.add_parser("evaluate", help="validate a model on local labelled images before go-live")
    esub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = esub.add_parser(
        "classifier",
        help="AUC with 95%% CI, sensitivity/specificity at the thresholds, suggested thresholds",
        description=(
            "Run the configured triage classifier (models.cxr_triage) over every DICOM image in\n"
            "--data and compare with --labels: a CSV with a header row, a key column\n"
            "(sop_instance_uid, or file: the file name or its path under --data) and one column\n"
            "per finding key with 1, 0 or empty. Prints per finding the AUC with a seeded\n"
            "bootstrap 95%% CI and sensitivity, specificity, PPV and NPV at the configured\n"
            "threshold (score >= threshold is positive); with --target-sensitivity/--target-ppv\n"
            "it suggests thresholds. Progress goes to stderr."
        ),
        formatter_class=raw,
    )
    _add_config(e)
    e.add_argument("--data", type=Path, required=True, metavar="FOLDER", help="DICOM images")
    e.add_argument("--labels", type=Path, required=True, metavar="CSV", help="labels file")
    e.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        metavar="S",
        help="suggest the highest threshold with sensitivity >= S (e.g. 0.95)",
    )
    e.add_argument(
        "--target-ppv",
        type=float,
        default=None,
        metavar="P",
        help="suggest the lowest threshold with PPV >= P (e.g. 0.8)",
    )
    e.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI (default 1000)"
    )
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    e.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write JSON")
    e.add_argument("--csv", type=Path, default=None, metavar="FILE", help="also write CSV")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    e.set_defaults(func=cmd_evaluate_classifier)

    p = sub.add_parser(
        "route", help="routing rules: which pipeline and queue a study gets, and why"
    )
    rsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = rsub.add_parser(
        "explain",
        help="show which routing rule a study matches, why earlier rules did not, and the queue",
        description=(
            "Read the headers of DICOM files (folders are searched), group them by study and apply\n"
            "the routing rules of the settings file as the node does at completion: each rule in\n"
            "order with the condition that failed and the value seen, then the pipeline, the\n"
            "priority and the queue. Patient identifiers are not printed."
        ),
        formatter_class=raw,
    )
    _add_config(r)
    r.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_FOLDER", help="DICOM files")
    r.add_argument(
        "--calling-aet", default=None, help="the AE title that would send the study (default none)"
    )
    r.add_argument(
        "--called-aet", default=None, help="the AE title it would be sent to (default none)"
    )
    r.set_defaults(func=cmd_route_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
