"""A small X.509 toolkit for the etcd connection: a CA, certificates it signs, TLS contexts.

Made with ``cryptography`` (already a dependency).  Keys are ECDSA P-256: a handshake
signs and verifies with it in tens of microseconds, where RSA-2048 signing costs ~1 ms.

Files are private: every directory made here is mode 0700 and every file (key or
certificate) 0600, written to a temporary name with ``O_EXCL`` and renamed into place,
so a key is never readable by others, not even for an instant, and a crash leaves no
half-written PEM behind.

:class:`CertificateAuthority` is one CA kept as ``<dir>/<name>.crt`` + ``<dir>/<name>.key``
(loaded if they exist, else created); :meth:`CertificateAuthority.issue` writes a leaf
certificate and key signed by it.  :func:`client_context` / :func:`server_context` build
the :class:`ssl.SSLContext` for either end.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) if needed and make it mode 0700."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` as a mode-0600 file, atomically (temp, fsync, rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, p)
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return p


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for n in names:
        if not n or n in seen:
            continue
        seen.add(n)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its key, as files."""

    cert: Path
    key: Path


class CertificateAuthority:
    """A CA in ``directory`` as ``<name>.crt`` and ``<name>.key``: loaded, or created."""

    def __init__(self, directory: str | os.PathLike[str], name: str, common_name: str) -> None:
        self.dir = private_dir(directory)
        self.cert_path = self.dir / f"{name}.crt"
        self.key_path = self.dir / f"{name}.key"
        if self.cert_path.exists() and self.key_path.exists():
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{self.key_path}: not an EC private key")
            self.key = key
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self.key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        # key first: a CA certificate without its key would be re-made next time anyway
        write_private(self.key_path, _key_pem(self.key))
        write_private(self.cert_path, self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        directory: str | os.PathLike[str],
        name: str,
        common_name: str | None,
        *,
        unit: str | None = None,
        hosts: list[str] | None = None,
        server: bool = False,
        client: bool = False,
        reuse: bool = True,
    ) -> Issued:
        """``<directory>/<name>.crt`` + ``.key`` signed by this CA.

        The subject is ``O=Cohort``, ``OU=unit`` (when given) and ``CN=common_name`` (when
        not None: etcd with user auth on refuses gateway clients whose certificate has a
        CN).  ``hosts`` become the subject alternative names (IP addresses or DNS names);
        ``server`` / ``client`` set the extended key usages.  With ``reuse`` an existing
        pair signed by this CA that names every host is kept.
        """
        d = private_dir(directory)
        out = Issued(d / f"{name}.crt", d / f"{name}.key")
        hosts = list(hosts or [])
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cohort")]
        if unit:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        if common_name is not None:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        subject = x509.Name(attrs)
        if (
            reuse
            and out.cert.exists()
            and out.key.exists()
            and self._covers(out.cert, subject, hosts)
        ):
            return out
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=False,
                    key_agreement=True,
                    content_commitment=False,
                    data_encipherment=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if usages:
            b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if hosts:
            b = b.add_extension(_san(hosts), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        write_private(out.key, _key_pem(key))
        write_private(out.cert, cert.public_bytes(serialization.Encoding.PEM))
        return out

    def _covers(self, cert_path: Path, subject: x509.Name, hosts: list[str]) -> bool:
        """The certificate there is ours, for ``subject``, names every host, and has a
        month or more to live."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            return False
        if cert.issuer != self.cert.subject or cert.subject != subject:
            return False
        try:
            cert.verify_directly_issued_by(self.cert)
        except Exception:  # InvalidSignature, ValueError, TypeError
            return False
        if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC) + datetime.timedelta(
            days=30
        ):
            return False
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return not hosts
        have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        have |= set(san.get_values_for_type(x509.DNSName))
        want = set()
        for h in hosts:
            try:
                want.add(str(ipaddress.ip_address(h)))
            except ValueError:
                want.add(h)
        return want <= have


def client_context(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A TLS client context: verify the server against ``ca`` (the system's trust store
    without one) and present ``cert``/``key`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def server_context(
    ca: str | os.PathLike[str], cert: str | os.PathLike[str], key: str | os.PathLike[str]
) -> ssl.SSLContext:
    """A TLS server context that requires a client certificate signed by ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
