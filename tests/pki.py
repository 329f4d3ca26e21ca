"""Certificates for DICOM TLS tests, made with the ``openssl`` command: a hospital CA with a server
and a client identity, and a stranger CA with an identity nobody trusts."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.servers import require_tool


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Identity
    client: Identity
    # Signed by a CA the node does not trust.
    stranger: Identity
    stranger_ca: Path


def _openssl(*args: str | Path) -> None:
    openssl = require_tool("openssl")
    completed = subprocess.run(
        [openssl, *map(str, args)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _issue(folder: Path, name: str, ca: tuple[Path, Path]) -> Identity:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return Identity(cert, key)


def make_pki(folder: Path) -> Pki:
    """A hospital CA with server and client identities, and a stranger with its own CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "hospital-ca")
    stranger_ca = _make_ca(folder, "stranger-ca")
    return Pki(
        ca=ca[0],
        server=_issue(folder, "pacs-ai-node", ca),
        client=_issue(folder, "modality", ca),
        stranger=_issue(folder, "stranger", stranger_ca),
        stranger_ca=stranger_ca[0],
    )
