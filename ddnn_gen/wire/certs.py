"""A private certificate authority made with the openssl command-line tool: a CA, a broker certificate for
the host names and addresses clients use, and client certificates whose common name is the MQTT identity.

For tests, the demo and first deployments; a production deployment would rather use its own PKI (the
broker-config command takes existing files as well). Keys are EC P-256, written with mode 0600.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddnn_gen.wire.connection import BrokerError
from ddnn_gen.wire.topics import check_name

DEFAULT_DAYS = 825  # the longest validity current TLS clients accept for a leaf certificate


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise BrokerError("the openssl command is not installed (apt-get install openssl); it makes the certificates")
    return found


def _run(args: list[str]) -> None:
    try:
        result = subprocess.run([_openssl(), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BrokerError(f"openssl {args[0]} failed: {error}") from error
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise BrokerError(f"openssl {args[0]} failed: {last}")


def _new_key(path: Path) -> None:
    _run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)])
    os.chmod(path, 0o600)


def make_ca(directory: Path, common_name: str = "ddnn private CA", days: int = DEFAULT_DAYS) -> CertificateFiles:
    """A self-signed CA: ``ca.crt`` (give it to every client and the broker) and ``ca.key`` (keep it safe)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(directory / "ca.crt", directory / "ca.key")
    _new_key(files.key)
    _run(["req", "-x509", "-new", "-key", str(files.key), "-out", str(files.cert), "-days", str(days), "-subj",
          f"/CN={common_name}", "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-addext", "subjectKeyIdentifier=hash"])
    return files


def _subject_alt_names(names: list[str]) -> str:
    entries = []
    for name in names:
        try:
            ipaddress.ip_address(name)
            entries.append(f"IP:{name}")
        except ValueError:
            entries.append(f"DNS:{name}")
    return ",".join(entries)


def make_certificate(directory: Path, ca: CertificateFiles, name: str, server_names: list[str] | None = None,
                     days: int = DEFAULT_DAYS) -> CertificateFiles:
    """``<name>.crt``/``<name>.key`` signed by ``ca``. With ``server_names`` a broker certificate valid for those
    host names and addresses; else a client certificate whose common name ``name`` is the MQTT identity."""
    check_name(name, "certificate name")
    directory.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(directory / f"{name}.crt", directory / f"{name}.key")
    _new_key(files.key)
    if server_names:
        usage = f"extendedKeyUsage=serverAuth\nsubjectAltName={_subject_alt_names(server_names)}\n"
    else:
        usage = "extendedKeyUsage=clientAuth\n"
    extensions = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
                  "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + usage)
    with tempfile.TemporaryDirectory(prefix="ddnn-cert-") as tmp:
        request = Path(tmp) / "request.csr"
        ext = Path(tmp) / "ext.cnf"
        ext.write_text(extensions)
        _run(["req", "-new", "-key", str(files.key), "-out", str(request), "-subj", f"/CN={name}"])
        _run(["x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-out",
              str(files.cert), "-days", str(days), "-set_serial", str(secrets.randbits(63)), "-extfile", str(ext)])
    return files
