"""Node identities for authenticated SecAgg+: Ed25519 signing keys certified by the federation CA.

Bonawitz et al. (CCS 2017, sec. 6, "active adversaries") sign every advertised key with a
long-term key certified by a PKI, so a coordinator cannot substitute a client's neighbours'
keys (it would learn that client's update) or invent sybil clients. Here:

* the federation CA (``fedpeft certs``; its private key stays with the operator, never on the
  coordinator) issues each node an X.509 certificate for an Ed25519 public key, with the
  extended key usage :data:`SECAGG_NODE_USAGE` (a TLS certificate cannot stand in for it);
* a client signs ``label | len | session | client id | enc_pk | mask_pk | commitment`` with its
  node key (:func:`advertisement_message`); every client verifies each neighbour's certificate
  against its own pinned CA and the signature before it shares anything with that neighbour.

Certificates are parsed with ``cryptography`` (bounded size, typed errors only); signatures
are Ed25519 (RFC 8032). The node's key is long-lived device material: it is never put in the
round state or in any message. Pure like the rest of secagg: the caller reads the key files
and passes the clock.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpeft.secagg.errors import AuthenticationError, MalformedMessageError

#: Extended key usage a SecAgg node certificate must carry (an OID in the UUID arc, X.667).
SECAGG_NODE_USAGE = x509.ObjectIdentifier("2.25.191633927614346375227950566426302735105")
#: Largest DER certificate a message may carry.
MAX_CERT_BYTES = 2048
#: Length of an Ed25519 signature.
SIGNATURE_BYTES = 64
#: Most verified certificates a trust anchor remembers (one per node of a federation).
MAX_VERIFIED = 1 << 16
#: Length of an Ed25519 public key.
PUBLIC_KEY_BYTES = 32
_ADVERTISE_LABEL = b"fedpeft/secagg/v1/advertise"


class PeerKeysLike(Protocol):
    """What :func:`verify_advertisement` reads (:class:`fedpeft.secagg.messages.PeerKeys`)."""

    @property
    def client_id(self) -> int: ...
    @property
    def enc_pk(self) -> bytes: ...
    @property
    def mask_pk(self) -> bytes: ...
    @property
    def commitment(self) -> bytes: ...
    @property
    def certificate(self) -> bytes: ...
    @property
    def signature(self) -> bytes: ...


def advertisement_message(session_id: bytes, client_id: int, enc_pk: bytes, mask_pk: bytes,
                          commitment: bytes) -> bytes:
    """The bytes a client signs for its advertisement (binds keys to session and client id)."""
    return (_ADVERTISE_LABEL + struct.pack(">B", len(session_id)) + session_id
            + struct.pack(">Q", client_id) + enc_pk + mask_pk + commitment)


_CONSISTENCY_LABEL = b"fedpeft/secagg/v1/consistency"


def consistency_message(session_id: bytes, signer: int, survivors: tuple[int, ...] | list[int]) -> bytes:
    """The bytes a survivor signs in the consistency check: the survivor set of this session,
    bound to the signer's id (Bonawitz et al. CCS 2017, round 3)."""
    ids = sorted(survivors)
    return (_CONSISTENCY_LABEL + struct.pack(">B", len(session_id)) + session_id
            + struct.pack(f">QI{len(ids)}Q", signer, len(ids), *ids))


@dataclass(frozen=True)
class VerifiedPeer:
    """A certificate that passed :meth:`TrustAnchor.verify`: its subject and signing key."""

    name: str
    public_key: bytes  # raw Ed25519, 32 B


#: Source of the current time (UTC, aware), passed in explicitly: secagg reads no clock.
Clock = Callable[[], dt.datetime]


class TrustAnchor:
    """The federation CA certificate a party pins; verifies node certificates against it at
    the time ``clock()`` gives (the caller passes ``lambda: datetime.now(UTC)``)."""

    def __init__(self, ca_certificate: x509.Certificate, clock: Clock) -> None:
        self.ca = ca_certificate
        self.clock = clock
        # certificates whose issuer signature, usage and key already verified (the validity
        # window is checked again on every use): a neighbour's certificate comes back with its
        # consistency signature, and simulated clients share one anchor
        self._verified: dict[bytes, tuple[VerifiedPeer, dt.datetime, dt.datetime]] = {}

    @classmethod
    def from_pem(cls, data: bytes, clock: Clock) -> TrustAnchor:
        """Load the CA certificate (PEM, ``fedpeft certs``' ``ca.crt``); typed errors."""
        try:
            return cls(x509.load_pem_x509_certificate(data), clock)
        except ValueError as exc:
            raise AuthenticationError(f"the SecAgg CA certificate is not a PEM X.509 "
                                      f"certificate: {exc}") from exc

    def verify(self, certificate_der: bytes, now: dt.datetime | None = None) -> VerifiedPeer:
        """Check that ``certificate_der`` was issued by this CA, is valid at ``now``, carries
        :data:`SECAGG_NODE_USAGE` and certifies an Ed25519 key; return that key.

        Raises :class:`MalformedMessageError` for bytes that are not a bounded DER certificate
        and :class:`AuthenticationError` for any failed check.
        """
        if not isinstance(certificate_der, bytes) or not 0 < len(certificate_der) <= MAX_CERT_BYTES:
            raise MalformedMessageError(f"node certificate of {len(certificate_der)} bytes must be "
                                        f"1..{MAX_CERT_BYTES} bytes of DER")
        moment = now if now is not None else self.clock()
        hit = self._verified.get(certificate_der)
        if hit is not None:
            peer, start, end = hit
            if not start <= moment <= end:
                raise AuthenticationError(f"node certificate {peer.name!r} is not valid now "
                                          f"({start} .. {end})")
            return peer
        try:
            cert = x509.load_der_x509_certificate(certificate_der)
        except ValueError as exc:
            raise MalformedMessageError(f"node certificate is not DER X.509: {exc}") from exc
        try:  # security: issued by the pinned CA (issuer name and signature)
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise AuthenticationError(f"node certificate {_subject(cert)!r} is not issued by the "
                                      f"federation CA: {exc}") from exc
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise AuthenticationError(f"node certificate {_subject(cert)!r} is not valid now "
                                      f"({cert.not_valid_before_utc} .. {cert.not_valid_after_utc})")
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, ValueError) as exc:
            raise AuthenticationError(f"node certificate {_subject(cert)!r} has no SecAgg "
                                      "extended key usage") from exc
        if SECAGG_NODE_USAGE not in usage:  # security: a TLS certificate is not a node identity
            raise AuthenticationError(f"node certificate {_subject(cert)!r} is not for SecAgg "
                                      "(missing its extended key usage)")
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise AuthenticationError(f"node certificate {_subject(cert)!r} certifies a "
                                      f"{type(key).__name__}, not an Ed25519 key")
        peer = VerifiedPeer(_subject(cert), key.public_bytes_raw())
        if len(self._verified) < MAX_VERIFIED:
            self._verified[certificate_der] = (peer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        return peer


def verify_signature(public_key: bytes, message: bytes, signature: bytes, who: str) -> None:
    """Raise :class:`AuthenticationError` unless ``signature`` is ``public_key``'s on ``message``."""
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedMessageError(f"signature of {who} has {len(signature)} bytes; expected "
                                    f"{SIGNATURE_BYTES}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:  # security: never accept an unverified key
        raise AuthenticationError(f"the advertisement of {who} is not signed by its certified "
                                  "key (substituted or corrupted keys)") from exc


class NodeIdentity:
    """This node's signing key, its certificate (DER) and the CA it trusts.

    ``fedpeft certs`` writes ``nodes/secagg-<name>.key`` (PKCS#8 PEM) and
    ``nodes/secagg-<name>.crt`` (PEM); a SuperNode's node-config keys ``secagg-node-key``,
    ``secagg-node-cert`` and ``secagg-ca`` name them (simulations: the run knob
    ``secagg-sim-identities``).
    """

    def __init__(self, signing_key: Ed25519PrivateKey, certificate_der: bytes,
                 trust: TrustAnchor) -> None:
        peer = trust.verify(certificate_der)  # fail at start-up, not mid-round
        if peer.public_key != signing_key.public_key().public_bytes_raw():
            raise AuthenticationError(f"the SecAgg node key does not match its certificate "
                                      f"{peer.name!r}; enroll the node again")
        self._key = signing_key
        self.certificate = certificate_der
        self.trust = trust
        self.name = peer.name
        self.public_key = peer.public_key

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes, trust: TrustAnchor) -> NodeIdentity:
        """The node's key (PKCS#8 PEM) and certificate (PEM), as ``fedpeft certs`` writes
        them; typed errors say which is wrong (the caller reads the files)."""
        try:
            key = serialization.load_pem_private_key(key_pem, None)
        except (ValueError, TypeError) as exc:
            raise AuthenticationError(f"secagg-node-key is not an unencrypted PEM private key: "
                                      f"{exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise AuthenticationError(f"secagg-node-key holds a {type(key).__name__}; an "
                                      "Ed25519 key is needed (fedpeft certs writes one)")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise AuthenticationError(f"secagg-node-cert is not a PEM certificate: {exc}") from exc
        return cls(key, cert.public_bytes(serialization.Encoding.DER), trust)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message`` with the node key."""
        return self._key.sign(message)

    def __repr__(self) -> str:  # security: never print the key
        return f"NodeIdentity(name={self.name!r})"


def _subject(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        return "?"
    value = names[0].value if names else "?"
    return value if isinstance(value, str) else value.decode("utf-8", "replace")



def verify_advertisement(keys: PeerKeysLike, session_id: bytes,
                         trust: TrustAnchor | None) -> bytes | None:
    """Check one advertisement's certificate and signature; return the signer's key.

    ``trust=None`` (an unauthenticated round): the advertisement must carry neither (None is
    returned). Otherwise both must be present and valid (:class:`AuthenticationError` or
    :class:`MalformedMessageError`).
    """
    who = f"client {keys.client_id}"
    if trust is None:
        if keys.certificate or keys.signature:
            raise AuthenticationError(f"{who} sent a signed advertisement in an unauthenticated "
                                      "round; run both sides with the same secagg-ca")
        return None
    if not keys.certificate:  # security: an authenticated round accepts only signed keys
        raise AuthenticationError(f"{who} sent an unsigned advertisement in an authenticated "
                                  "round")
    peer = trust.verify(keys.certificate)
    verify_signature(peer.public_key, advertisement_message(
        session_id, keys.client_id, keys.enc_pk, keys.mask_pk, keys.commitment),
        keys.signature, who)
    return peer.public_key
