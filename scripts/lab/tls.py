"""The lab's own certificate authority and the gateway's certificate: LAB STAND-INS for a site's
CA and the certificate it would issue for the gateway's name. Made once per lab by `lab.py up`
(kept in .lab/<lab>/tls/), never committed; the private keys are 0600.

    paths = ensure(state_dir / "tls", "gateway.gpulab.lab")
    # {"ca": ".../ca.pem", "cert": ".../gateway.pem", "key": ".../gateway.key", "name": ...}
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

CA_NAME = "gpu-fleet lab CA (LAB STAND-IN)"
VALID_DAYS = 90


def server_name(lab: str) -> str:
    """The name the lab gateway's certificate is for (clients verify it, as for llm.example.com)."""
    return f"gateway.{lab}.lab"


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(data)


def new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(ca_key, ca_cert, name: str, key, not_before: dt.datetime, days: int):
    """A server certificate for `name` signed by the CA (serverAuth, SAN = the name)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def make_ca(days: int = VALID_DAYS):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def write_pair(directory: Path, stem: str, cert, key) -> dict[str, str]:
    """<stem>.pem (the certificate) and <stem>.key (0600)."""
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / f"{stem}.key", _pem_key(key))
    return {"cert": str(directory / f"{stem}.pem"), "key": str(directory / f"{stem}.key")}


def ensure(directory: Path, name: str) -> dict[str, str]:
    """The lab CA and the gateway's certificate for `name`, made when missing or expiring
    within a week (then both anew)."""
    from cryptography import x509

    ca_path, cert_path = directory / "ca.pem", directory / "gateway.pem"
    paths = {"ca": str(ca_path), "cert": str(cert_path), "key": str(directory / "gateway.key"),
             "name": name}
    if cert_path.exists() and ca_path.exists() and (directory / "gateway.key").exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7)
        if cert.not_valid_after_utc > soon and name in str(cert.subject):
            return paths
    ca_key, ca_cert = make_ca()
    write_pair(directory, "ca", ca_cert, ca_key)
    (directory / "ca.key").chmod(0o600)
    key = new_key()
    write_pair(directory, "gateway", issue(ca_key, ca_cert, name, key,
                                           ca_cert.not_valid_before_utc, VALID_DAYS - 1), key)
    return paths


if __name__ == "__main__":  # python -m scripts.lab.tls DIR NAME (from the venv: lab.py is stdlib-only)
    import json
    import sys

    print(json.dumps(ensure(Path(sys.argv[1]), sys.argv[2])))
