"""A private, offline Sigstore instance for ccnode's keyless interop tests.

It plays Fulcio (a root and an intermediate CA), the CT log (which signs
the SCT embedded in each leaf), Rekor v1 (a dsse/0.0.1 entry, its Merkle
inclusion proof, signed checkpoint and signed entry timestamp) and Rekor v2
(a hashedrekord/0.0.2 entry over the envelope's PAE, its inclusion proof
and a checkpoint signed with Ed25519, no time of its own), so that tests
can make keyless model signatures without the internet and have the
reference verifier (model_signing 1.1.1 on sigstore-python 4.5.1) judge
them.

instance OUT
    Creates the directory OUT: fulcio_root.{pem,key}, fulcio_intermediate.
    {pem,key} (both ECDSA P-384, valid 2020-2040), ctlog.{pub,key} and
    rekor.{pub,key} (ECDSA P-256), rekor2.key (the Rekor v2 log's Ed25519
    key; its log id is the signed-note key id of the name rekor2.test), an
    RSA timestamp authority tsa_rsa_root.pem and tsa_rsa.{pem,key} (RSA
    2048, SHA-256) and a weak one, tsa_rsa1024*, a timestamp authority
    tsa_root.pem and
    tsa.{pem,key} (ECDSA P-384), trusted_root.json and trust_config.json
    (a ClientTrustConfig with that trusted root and a signing config that
    names test URLs; nothing is ever contacted).

sign INSTANCE MODEL_DIR SIG_OUT --identity ID --issuer ISSUER
     [--variant V] [--hash sha256|blake2|blake3] [--time EPOCH]
     [--log-index-offset N]
    Signs MODEL_DIR with a fresh P-256 key: model_signing's own key signer
    makes the DSSE envelope (files serialization), the instance issues the
    leaf certificate for ID/ISSUER (SAN rfc822Name when ID holds an '@',
    URI otherwise) and logs the entry; SIG_OUT is the v0.3 bundle.  The
    signing time T is EPOCH, or now minus one hour (whole seconds); the leaf
    is valid from T to T+10 min and the entry is integrated at T+1 s.  The
    entry's logIndex is the inclusion proof's logIndex plus N (default 0;
    the public-good log's shards make them differ).
    Variants (each one named defect, all else valid; default ok):
      ok                 nothing wrong
      expired            leaf validity ends before the integrated time
      not_yet_valid      leaf validity starts after the integrated time
      no_codesigning     leaf EKU is serverAuth, not codeSigning
      no_sct             leaf has no embedded SCT list
      bad_sct            the SCT (log id of the trusted CT log) is signed by
                         another key
      untrusted_ca       leaf issued by a CA, same names as the instance's,
                         that is not in the trust root
      bad_set            the signed entry timestamp is signed by another key
      bad_proof          one inclusion proof hash is altered
      bad_checkpoint     the checkpoint (key hint of the trusted log) is
                         signed by another key
      body_mismatch      the Rekor body records another valid signature, by
                         the same key over the same payload, than the
                         envelope's
      wrong_payload_hash the Rekor body's payloadHash is of other bytes
      wrong_key          the DSSE envelope is signed by a key other than the
                         certificate's (the Rekor body records that
                         signature, so it is consistent)
      tsa                an RFC 3161 timestamp over the signature from the
                         instance's timestamp authority (OpenSSL's TSA,
                         `openssl ts -reply`, at the current time; T is then
                         now minus 60 s, unless --time says otherwise)
      tsa_untrusted      the timestamp is by a TSA not in the trust root
      tsa_other_message  the timestamp is over other bytes
      tsa_after_expiry   a valid timestamp at a time the leaf has expired
                         (T stays now minus one hour)
      tsa_ess_v1         as tsa, the signer named by an ESS
                         signingCertificate (v1, SHA-1) instead of v2
      tsa_ess_other_cert the instance TSA's key and issuer and serial, but
                         the ESS signingCertificateV2 names another
                         certificate (no certificate embedded)
      tsa_ess_v1_other_cert  the same with ESS v1
      tsa_rsa            as tsa, from the instance's RSA timestamp authority
      tsa_rsa1024        as tsa, from the trusted RSA authority whose keys
                         are 1024 bits
    Rekor v2 variants: the entry is a hashedrekord/0.0.2 in the Ed25519 log
    (rekor2.test), no signed entry timestamp or integrated time, and the
    bundle holds a timestamp from the instance's TSA (T is now minus 60 s):
      v2                 nothing wrong
      v2_ecdsa_log       the entry is in the ECDSA P-256 log (rekor.test)
      v2_no_timestamp    no timestamp: no verified time at all
      v2_untrusted_timestamp  the only timestamp is by a TSA not in the root
      v2_tsa_rsa         the only timestamp is the RSA authority's
      v2_tsa_rsa1024     the only timestamp is by a trusted RSA authority
                         whose keys are 1024 bits
      v2_expired         the leaf expired before the timestamp's time
                         (T is now minus one hour)
      v2_bad_proof       one inclusion proof hash is altered
      v2_bad_checkpoint  the checkpoint (key hash of the trusted log) is
                         signed by another Ed25519 key
      v2_wrong_origin    the checkpoint is signed by the log's key but names
                         another origin than the log id was made from
      v2_wrong_digest    the body's digest is of other bytes
      v2_body_mismatch   the body records another valid signature, by the
                         same key over the same PAE, than the envelope's
      v2_integrated_time the entry carries an integrated time, unsigned (as
                         newer rekor-tiles write it): no verified time
      v2_with_set        the entry also carries an integrated time and a
                         signed entry timestamp (v2 logs issue none)
    The entry's logIndex is the proof's for these (--log-index-offset is
    for the v1 log only).

verify INSTANCE MODEL_DIR SIG --identity ID --issuer ISSUER [--api]
    Runs the reference CLI: model_signing verify sigstore --trust_config
    INSTANCE/trust_config.json --identity ID --identity_provider ISSUER
    --signature SIG MODEL_DIR.  Its error message goes to stderr.  The CLI
    re-hashes with files/sha256 whatever the signature says (a model_signing
    1.1.1 bug, see docs/model-signing.md), so it refuses every blake2 or
    blake3 signature; --api verifies through model_signing's Python API
    instead, which takes the hashing configuration from the signature
    (with helper.py's shims applied) and does not skip SIG when it lies
    inside MODEL_DIR unless the signature's ignore_paths name it.

Exit status 0 on success (verify: accepted), 1 on a refused verification,
2 on misuse.
"""

import argparse
import base64
import datetime
import hashlib
import json
import pathlib
import secrets
import struct
import subprocess
import sys
import tempfile

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

UTC = datetime.timezone.utc
OID_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_SCT_LIST = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")

REKOR_URL = "https://rekor.test"
REKOR_NAME = "rekor.test"
FULCIO_URL = "https://fulcio.test"
CTFE_URL = "https://ctfe.test"
OIDC_URL = "https://oauth2.test/auth"
OPERATOR = "ccnode.test"
START = "2020-01-01T00:00:00Z"
CA_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=UTC)
CA_NOT_AFTER = datetime.datetime(2040, 1, 1, tzinfo=UTC)
ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test"),
        x509.NameAttribute(NameOID.COMMON_NAME, "sigstore"),
    ]
)
INTERMEDIATE_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test"),
        x509.NameAttribute(NameOID.COMMON_NAME, "sigstore-intermediate"),
    ]
)

VARIANTS = (
    "ok",
    "expired",
    "not_yet_valid",
    "no_codesigning",
    "no_sct",
    "bad_sct",
    "untrusted_ca",
    "bad_set",
    "bad_proof",
    "bad_checkpoint",
    "body_mismatch",
    "wrong_payload_hash",
    "wrong_key",
    "tsa",
    "tsa_untrusted",
    "tsa_other_message",
    "tsa_after_expiry",
    "tsa_ess_v1",
    "tsa_ess_other_cert",
    "tsa_ess_v1_other_cert",
    "tsa_rsa",
    "tsa_rsa1024",
    "v2",
    "v2_ecdsa_log",
    "v2_no_timestamp",
    "v2_untrusted_timestamp",
    "v2_tsa_rsa",
    "v2_tsa_rsa1024",
    "v2_expired",
    "v2_bad_proof",
    "v2_bad_checkpoint",
    "v2_wrong_origin",
    "v2_wrong_digest",
    "v2_body_mismatch",
    "v2_integrated_time",
    "v2_with_set",
)

REKOR2_NAME = "rekor2.test"
REKOR2_URL = f"https://{REKOR2_NAME}"

TSA_URL = "https://tsa.test/api/v1/timestamp"
TSA_ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test"),
        x509.NameAttribute(NameOID.COMMON_NAME, "tsa-root"),
    ]
)
TSA_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test"),
        x509.NameAttribute(NameOID.COMMON_NAME, "tsa"),
    ]
)


class Misuse(Exception):
    pass


# ---------------------------------------------------------------- encodings


def b64(data):
    return base64.b64encode(data).decode()


def spki_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key):
    """RFC 6962 key id: sha256 of the DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der(public_key)).digest()


def note_key_id(name, public_key):
    """The signed-note key id of an Ed25519 key (c2sp.org/signed-note):
    sha256(name || 0x0A || 0x01 || key), what Rekor v2 uses as its log id."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()


def der_length(n):
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_utf8string(text):
    raw = text.encode()
    return b"\x0c" + der_length(len(raw)) + raw


def der_octet_string(raw):
    return b"\x04" + der_length(len(raw)) + raw


def u24(n):
    if n >= 1 << 24:
        raise ValueError("too long for a 24-bit length")
    return n.to_bytes(3, "big")


def write_key(path, key):
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def read_key(path):
    return serialization.load_pem_private_key(path.read_bytes(), None)


def write_pub(path, key):
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def read_cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_cert(path, cert):
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------- the CA


def make_ca():
    """A Fulcio-shaped root and intermediate (P-384, ECDSA-SHA384)."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    inter_key = ec.generate_private_key(ec.SECP384R1())
    ca_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(ROOT_NAME)
        .issuer_name(ROOT_NAME)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(ca_usage, critical=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(root_ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA384())
    )
    inter = (
        x509.CertificateBuilder()
        .subject_name(INTERMEDIATE_NAME)
        .issuer_name(ROOT_NAME)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(ca_usage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA384())
    )
    return root_key, root, inter_key, inter


def make_tsa(rsa_bits=None):
    """A timestamp authority: a root and a signing certificate (P-384, or
    RSA of rsa_bits with SHA-256), the signer with a critical extended key
    usage of timeStamping alone, as OpenSSL's TSA insists."""
    root_name, name = TSA_ROOT_NAME, TSA_NAME
    if rsa_bits:
        new_key = lambda: rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        sig_hash = hashes.SHA256()
        org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sigstore.test")
        cn = f"tsa-rsa{rsa_bits}"
        root_name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"{cn}-root")])
        name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    else:
        new_key = lambda: ec.generate_private_key(ec.SECP384R1())
        sig_hash = hashes.SHA384()
    root_key = new_key()
    key = new_key()
    usage = dict(
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(
            x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, sig_hash)
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(CA_NOT_BEFORE)
        .not_valid_after(CA_NOT_AFTER)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .sign(root_key, sig_hash)
    )
    return root, key, leaf


def twin_certificate(key, leaf):
    """A certificate with `leaf`'s subject, issuer, serial, key and usages
    but other bytes (a day shorter, signed by a throwaway key): what an
    ESS certificate hash tells apart from `leaf` and nothing else does."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(leaf.issuer)
        .public_key(key.public_key())
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc - datetime.timedelta(days=1))
    )
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())


def openssl_timestamp(work, key, leaf, message, ess_alg="sha256", embed=True):
    """An RFC 3161 TimeStampResp over sha256(message), made by OpenSSL's own
    TSA (`openssl ts -reply`) with `key`/`leaf`, at the current time.
    `ess_alg` sha1 makes OpenSSL name the signer with an ESS
    signingCertificate (v1), anything else with signingCertificateV2;
    `embed` False leaves the signer's certificate out of the token."""
    work = pathlib.Path(work)
    write_key(work / "tsa.key", key)
    write_cert(work / "tsa.pem", leaf)
    (work / "serial").write_text("01\n")
    (work / "tsa.cnf").write_text(
        "[ tsa ]\ndefault_tsa = t\n[ t ]\n"
        f"serial = {work / 'serial'}\n"
        "signer_digest = sha256\ndefault_policy = 1.3.6.1.4.1.57264.2\n"
        "digests = sha256, sha384, sha512\naccuracy = secs:1\nordering = no\n"
        f"tsa_name = no\ness_cert_id_chain = no\ness_cert_id_alg = {ess_alg}\n"
    )
    digest = hashlib.sha256(message).hexdigest()
    run = lambda *a: subprocess.run(["openssl", "ts", *a], check=True, capture_output=True)
    cert = ["-cert"] if embed else []
    run("-query", "-digest", digest, "-sha256", *cert, "-no_nonce", "-out", str(work / "q.tsq"))
    run(
        "-reply", "-queryfile", str(work / "q.tsq"), "-signer", str(work / "tsa.pem"),
        "-inkey", str(work / "tsa.key"), "-config", str(work / "tsa.cnf"),
        "-out", str(work / "r.tsr"),
    )
    return (work / "r.tsr").read_bytes()


def public_key_json(key):
    return {
        "rawBytes": b64(spki_der(key)),
        "keyDetails": "PKIX_ECDSA_P256_SHA_256",
        "validFor": {"start": START},
    }


def cmd_instance(out):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root_key, root, inter_key, inter = make_ca()
    ct_key = ec.generate_private_key(ec.SECP256R1())
    rekor_key = ec.generate_private_key(ec.SECP256R1())
    write_key(out / "fulcio_root.key", root_key)
    write_cert(out / "fulcio_root.pem", root)
    write_key(out / "fulcio_intermediate.key", inter_key)
    write_cert(out / "fulcio_intermediate.pem", inter)
    write_key(out / "ctlog.key", ct_key)
    write_pub(out / "ctlog.pub", ct_key.public_key())
    write_key(out / "rekor.key", rekor_key)
    write_pub(out / "rekor.pub", rekor_key.public_key())
    rekor2_key = ed25519.Ed25519PrivateKey.generate()
    write_key(out / "rekor2.key", rekor2_key)
    tsa_root, tsa_key, tsa_leaf = make_tsa()
    write_cert(out / "tsa_root.pem", tsa_root)
    write_key(out / "tsa.key", tsa_key)
    write_cert(out / "tsa.pem", tsa_leaf)
    rsa_tsas = []
    for bits, stem in ((2048, "tsa_rsa"), (1024, "tsa_rsa1024")):
        r_root, r_key, r_leaf = make_tsa(rsa_bits=bits)
        write_cert(out / f"{stem}_root.pem", r_root)
        write_key(out / f"{stem}.key", r_key)
        write_cert(out / f"{stem}.pem", r_leaf)
        rsa_tsas.append((stem, r_root, r_leaf))

    trusted_root = {
        "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "tlogs": [
            {
                "baseUrl": REKOR_URL,
                "hashAlgorithm": "SHA2_256",
                "publicKey": public_key_json(rekor_key.public_key()),
                "logId": {"keyId": b64(key_id(rekor_key.public_key()))},
            },
            {
                "baseUrl": REKOR2_URL,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": b64(spki_der(rekor2_key.public_key())),
                    "keyDetails": "PKIX_ED25519",
                    "validFor": {"start": START},
                },
                "logId": {"keyId": b64(note_key_id(REKOR2_NAME, rekor2_key.public_key()))},
            },
        ],
        "certificateAuthorities": [
            {
                "subject": {"organization": "sigstore.test", "commonName": "sigstore"},
                "uri": FULCIO_URL,
                "certChain": {
                    "certificates": [{"rawBytes": b64(der(inter))}, {"rawBytes": b64(der(root))}]
                },
                "validFor": {"start": START},
            }
        ],
        "ctlogs": [
            {
                "baseUrl": CTFE_URL,
                "hashAlgorithm": "SHA2_256",
                "publicKey": public_key_json(ct_key.public_key()),
                "logId": {"keyId": b64(key_id(ct_key.public_key()))},
            }
        ],
        "timestampAuthorities": [
            {
                "subject": {"organization": "sigstore.test", "commonName": "tsa"},
                "uri": TSA_URL,
                "certChain": {
                    "certificates": [
                        {"rawBytes": b64(der(tsa_leaf))},
                        {"rawBytes": b64(der(tsa_root))},
                    ]
                },
                "validFor": {"start": START},
            },
        ]
        + [
            {
                "subject": {"organization": "sigstore.test", "commonName": stem},
                "uri": TSA_URL,
                "certChain": {
                    "certificates": [{"rawBytes": b64(der(leaf))}, {"rawBytes": b64(der(root))}]
                },
                "validFor": {"start": START},
            }
            for stem, root, leaf in rsa_tsas
        ],
    }

    def service(url):
        return {
            "url": url,
            "majorApiVersion": 1,
            "validFor": {"start": START},
            "operator": OPERATOR,
        }

    signing_config = {
        "mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
        "caUrls": [service(FULCIO_URL)],
        "oidcUrls": [service(OIDC_URL)],
        "rekorTlogUrls": [service(REKOR_URL)],
        "tsaUrls": [service(TSA_URL)],
        "rekorTlogConfig": {"selector": "ANY"},
        "tsaConfig": {"selector": "ANY"},
    }
    trust_config = {
        "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
        "trustedRoot": trusted_root,
        "signingConfig": signing_config,
    }
    (out / "trusted_root.json").write_text(json.dumps(trusted_root, indent=2) + "\n")
    (out / "trust_config.json").write_text(json.dumps(trust_config, indent=2) + "\n")
    print(f"instance written to {out}")
    return 0


# ---------------------------------------------------------------- Fulcio + CT


def sct_list_extension(log_key, signing_key, timestamp_ms, issuer_pub, tbs):
    """The embedded SCT list: one v1 SCT over the precertificate entry.

    log_key names the log (its key id goes in the SCT); signing_key signs.
    """
    extensions = b""
    signed = (
        struct.pack("!BBQH", 0, 0, timestamp_ms, 1)  # v1, certificate_timestamp, precert_entry
        + key_id(issuer_pub)  # issuer_key_hash
        + u24(len(tbs))
        + tbs
        + struct.pack("!H", len(extensions))
        + extensions
    )
    sig = signing_key.sign(signed, ec.ECDSA(hashes.SHA256()))
    sct = (
        struct.pack("!B", 0)
        + key_id(log_key.public_key())
        + struct.pack("!QH", timestamp_ms, len(extensions))
        + extensions
        + struct.pack("!BBH", 4, 3, len(sig))  # sha256, ecdsa
        + sig
    )
    serialized = struct.pack("!H", len(sct)) + sct
    tls_list = struct.pack("!H", len(serialized)) + serialized
    return x509.UnrecognizedExtension(OID_SCT_LIST, der_octet_string(tls_list))


def issue_leaf(
    leaf_pub, inter_key, inter, ct_key, sct_signer, identity, issuer, not_before,
    not_after, eku, with_sct,
):
    if "@" in identity:
        san = x509.RFC822Name(identity)
    else:
        san = x509.UniformResourceIdentifier(identity)
    inter_ski = inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    extensions = [
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
        (x509.ExtendedKeyUsage([eku]), False),
        (x509.SubjectKeyIdentifier.from_public_key(leaf_pub), False),
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(inter_ski), False),
        (x509.SubjectAlternativeName([san]), True),
        (x509.UnrecognizedExtension(OID_ISSUER_V1, issuer.encode()), False),
        (x509.UnrecognizedExtension(OID_ISSUER_V2, der_utf8string(issuer)), False),
    ]
    serial = x509.random_serial_number()

    def build(extra):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(inter.subject)
            .public_key(leaf_pub)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        for ext, critical in extensions + extra:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(inter_key, hashes.SHA384())

    pre = build([])
    if not with_sct:
        return pre
    timestamp_ms = int(not_before.timestamp()) * 1000
    ext = sct_list_extension(
        ct_key, sct_signer, timestamp_ms, inter.public_key(), pre.tbs_certificate_bytes
    )
    cert = build([(ext, False)])
    if cert.tbs_precertificate_bytes != pre.tbs_certificate_bytes:
        raise AssertionError("precertificate TBS does not match the final TBS minus SCTs")
    return cert


# ---------------------------------------------------------------- Rekor


def leaf_hash(body):
    return hashlib.sha256(b"\x00" + body).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves):
    """RFC 6962 Merkle tree hash over already-hashed leaves."""
    if len(leaves) == 1:
        return leaves[0]
    k = split_point(len(leaves))
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def audit_path(m, leaves):
    """RFC 6962 PATH(m, D[n]), bottom-up."""
    if len(leaves) == 1:
        return []
    k = split_point(len(leaves))
    if m < k:
        return audit_path(m, leaves[:k]) + [mth(leaves[k:])]
    return audit_path(m - k, leaves[k:]) + [mth(leaves[:k])]


def small_tree(body, bad_proof=False):
    """A log of 5 to 9 entries holding `body` at a random index, the others
    random: (tree size, index, root hash, audit path), one path hash
    altered when bad_proof."""
    tree_size = 5 + secrets.randbelow(5)
    index = secrets.randbelow(tree_size)
    bodies = [secrets.token_bytes(32) for _ in range(tree_size)]
    bodies[index] = body
    leaves = [leaf_hash(b) for b in bodies]
    path = audit_path(index, leaves)
    if bad_proof:
        altered = bytearray(path[0])
        altered[0] ^= 0x01
        path[0] = bytes(altered)
    return tree_size, index, mth(leaves), path


def log_origin(rekor_pub):
    tree_id = int.from_bytes(key_id(rekor_pub)[:8], "big") >> 1
    return f"{REKOR_NAME} - {tree_id}"


def checkpoint(rekor_pub, signing_key, tree_size, root_hash):
    """A signed note as Rekor v1 writes it and sigstore-python reads it."""
    note = f"{log_origin(rekor_pub)}\n{tree_size}\n{b64(root_hash)}\n"
    sig = signing_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
    hint = key_id(rekor_pub)[:4]
    return f"{note}\n\u2014 {REKOR_NAME} {b64(hint + sig)}\n"


def rekor_body(payload, envelope_json, sig_b64, cert, payload_hash=None):
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    body = {
        "apiVersion": "0.0.1",
        "kind": "dsse",
        "spec": {
            "envelopeHash": {
                "algorithm": "sha256",
                "value": hashlib.sha256(envelope_json.encode()).hexdigest(),
            },
            "payloadHash": {
                "algorithm": "sha256",
                "value": payload_hash or hashlib.sha256(payload).hexdigest(),
            },
            "signatures": [{"signature": sig_b64, "verifier": b64(cert_pem)}],
        },
    }
    return rfc8785.dumps(body)


def log_entry(rekor_key, body, integrated_time, variant, index_offset):
    rogue = ec.generate_private_key(ec.SECP256R1())
    rekor_pub = rekor_key.public_key()
    log_id = key_id(rekor_pub)
    tree_size, index, root_hash, path = small_tree(body, bad_proof=(variant == "bad_proof"))
    entry_index = index + index_offset
    set_payload = rfc8785.dumps(
        {
            "body": b64(body),
            "integratedTime": integrated_time,
            "logID": log_id.hex(),
            "logIndex": entry_index,
        }
    )
    set_signer = rogue if variant == "bad_set" else rekor_key
    cp_signer = rogue if variant == "bad_checkpoint" else rekor_key
    return {
        "logIndex": str(entry_index),
        "logId": {"keyId": b64(log_id)},
        "kindVersion": {"kind": "dsse", "version": "0.0.1"},
        "integratedTime": str(integrated_time),
        "inclusionPromise": {
            "signedEntryTimestamp": b64(set_signer.sign(set_payload, ec.ECDSA(hashes.SHA256())))
        },
        "inclusionProof": {
            "logIndex": str(index),
            "rootHash": b64(root_hash),
            "treeSize": str(tree_size),
            "hashes": [b64(h) for h in path],
            "checkpoint": {"envelope": checkpoint(rekor_pub, cp_signer, tree_size, root_hash)},
        },
        "canonicalizedBody": b64(body),
    }


def v2_checkpoint(origin, log_id, signer, tree_size, root_hash):
    """A signed note as Rekor v2 (Tessera) writes it: origin, size, root;
    one signature line named by the origin, its key hash the first four
    bytes of the log id; Ed25519 over the note text, or ECDSA P-256."""
    note = f"{origin}\n{tree_size}\n{b64(root_hash)}\n"
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        sig = signer.sign(note.encode())
    else:
        sig = signer.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
    return f"{note}\n\u2014 {origin} {b64(log_id[:4] + sig)}\n"


def v2_body(pae, sig_b64, cert, digest_of=None):
    """A hashedrekord/0.0.2 body for a DSSE envelope (rekor-v2-spec 6.1.4)
    signed with a P-256 leaf, as rekor-tiles marshals it (protojson field
    order)."""
    digest = hashlib.sha256(digest_of or pae).digest()
    body = {
        "kind": "hashedrekord",
        "apiVersion": "0.0.2",
        "spec": {
            "hashedRekordV002": {
                "data": {"algorithm": "SHA2_256", "digest": b64(digest)},
                "signature": {
                    "content": sig_b64,
                    "verifier": {
                        "x509Certificate": {"rawBytes": b64(der(cert))},
                        "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    },
                },
            }
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def v2_log_entry(inst, body, variant):
    """A Rekor v2 TransparencyLogEntry as rekor-tiles returns it: the log
    index is the shard's (the proof's), no inclusion promise, and no
    integrated time (newer rekor-tiles write an unsigned one: variant
    v2_integrated_time)."""
    if variant == "v2_ecdsa_log":
        log_key = read_key(inst / "rekor.key")
        log_id, origin = key_id(log_key.public_key()), REKOR_NAME
    else:
        log_key = read_key(inst / "rekor2.key")
        log_id, origin = note_key_id(REKOR2_NAME, log_key.public_key()), REKOR2_NAME
    tree_size, index, root_hash, path = small_tree(body, bad_proof=(variant == "v2_bad_proof"))
    signer = log_key
    if variant == "v2_bad_checkpoint":
        signer = ed25519.Ed25519PrivateKey.generate()
    if variant == "v2_wrong_origin":
        origin = "rekor3.test"
    entry = {
        "logIndex": str(index),
        "logId": {"keyId": b64(log_id)},
        "kindVersion": {"kind": "hashedrekord", "version": "0.0.2"},
        "inclusionProof": {
            "logIndex": str(index),
            "rootHash": b64(root_hash),
            "treeSize": str(tree_size),
            "hashes": [b64(h) for h in path],
            "checkpoint": {
                "envelope": v2_checkpoint(origin, log_id, signer, tree_size, root_hash)
            },
        },
        "canonicalizedBody": b64(body),
    }
    integrated_time = int(datetime.datetime.now(UTC).timestamp()) - 30
    if variant in ("v2_integrated_time", "v2_with_set"):
        entry["integratedTime"] = str(integrated_time)
    if variant == "v2_with_set":
        set_payload = rfc8785.dumps(
            {
                "body": b64(body),
                "integratedTime": integrated_time,
                "logID": log_id.hex(),
                "logIndex": index,
            }
        )
        entry["inclusionPromise"] = {"signedEntryTimestamp": b64(log_key.sign(set_payload))}
    return entry


# ---------------------------------------------------------------- signing


def dsse_envelope(model_dir, key, hash_algo, ignored):
    """The envelope model_signing's own key signer makes, unchanged."""
    import model_signing

    with tempfile.TemporaryDirectory() as tmp:
        key_path = pathlib.Path(tmp) / "leaf.key"
        write_key(key_path, key)
        sig_path = pathlib.Path(tmp) / "key.sig"
        hashing = model_signing.hashing.Config().use_file_serialization(
            hashing_algorithm=hash_algo
        )
        hashing.set_ignored_paths(paths=ignored)
        (
            model_signing.signing.Config()
            .use_elliptic_key_signer(private_key=key_path)
            .set_hashing_config(hashing)
            .sign(model_dir, sig_path)
        )
        return json.loads(sig_path.read_text())["dsseEnvelope"]


def envelope_submitted_json(envelope):
    """The envelope JSON a sigstore-python client submits (its envelopeHash input)."""
    from sigstore import dsse
    from sigstore_models.intoto import Envelope

    return dsse.Envelope(Envelope.from_json(json.dumps(envelope))).to_json()


def cmd_sign(args):
    inst = pathlib.Path(args.instance)
    model_dir = pathlib.Path(args.model_dir)
    sig_out = pathlib.Path(args.sig_out)
    if not model_dir.exists():
        raise Misuse(f"no model at {model_dir}")
    if args.variant not in VARIANTS:
        raise Misuse(f"unknown variant {args.variant}; one of {', '.join(VARIANTS)}")
    v = args.variant
    inter_key = read_key(inst / "fulcio_intermediate.key")
    inter = read_cert(inst / "fulcio_intermediate.pem")
    ct_key = read_key(inst / "ctlog.key")
    rekor_key = read_key(inst / "rekor.key")

    v2 = v.startswith("v2")
    if args.time is not None:
        t = datetime.datetime.fromtimestamp(int(args.time), tz=UTC)
    elif (v.startswith("tsa") and v != "tsa_after_expiry") or (v2 and v != "v2_expired"):
        # OpenSSL's TSA stamps the current time: sign just before it, so
        # that the timestamp falls inside the leaf's ten minutes.
        t = datetime.datetime.now(UTC).replace(microsecond=0) - datetime.timedelta(seconds=60)
    else:
        t = datetime.datetime.now(UTC).replace(microsecond=0) - datetime.timedelta(hours=1)
    integrated_time = int(t.timestamp()) + 1
    ten_min = datetime.timedelta(minutes=10)
    not_before, not_after = t, t + ten_min
    if v == "expired":
        not_before, not_after = t - ten_min, t - datetime.timedelta(seconds=1)
    elif v == "not_yet_valid":
        not_before, not_after = t + datetime.timedelta(seconds=2), t + ten_min

    ignored = []
    try:
        ignored.append(sig_out.resolve().relative_to(model_dir.resolve()))
    except ValueError:
        pass

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    dsse_key = ec.generate_private_key(ec.SECP256R1()) if v == "wrong_key" else leaf_key
    envelope = dsse_envelope(model_dir, dsse_key, args.hash, ignored)
    if len(envelope["signatures"]) != 1:
        raise AssertionError("expected one DSSE signature")
    payload = base64.b64decode(envelope["payload"])
    sig_b64 = envelope["signatures"][0]["sig"]

    if v == "untrusted_ca":
        _, _, inter_key, inter = make_ca()
    eku = ExtendedKeyUsageOID.SERVER_AUTH if v == "no_codesigning" else ExtendedKeyUsageOID.CODE_SIGNING
    sct_signer = ec.generate_private_key(ec.SECP256R1()) if v == "bad_sct" else ct_key
    cert = issue_leaf(
        leaf_key.public_key(), inter_key, inter, ct_key, sct_signer, args.identity,
        args.issuer, not_before, not_after, eku, with_sct=(v != "no_sct"),
    )

    from sigstore.dsse import _pae

    pae = _pae(envelope["payloadType"], payload)
    body_sig = sig_b64
    if v in ("body_mismatch", "v2_body_mismatch"):
        body_sig = b64(leaf_key.sign(pae, ec.ECDSA(hashes.SHA256())))
    if v2:
        digest_of = b"not the PAE: " + pae if v == "v2_wrong_digest" else None
        body = v2_body(pae, body_sig, cert, digest_of)
        entry = v2_log_entry(inst, body, v)
    else:
        payload_hash = None
        if v == "wrong_payload_hash":
            payload_hash = hashlib.sha256(b"not the payload: " + payload).hexdigest()
        body = rekor_body(payload, envelope_submitted_json(envelope), body_sig, cert, payload_hash)
        entry = log_entry(rekor_key, body, integrated_time, v, args.log_index_offset)

    timestamps = {}
    if v.startswith("tsa") or (v2 and v != "v2_no_timestamp"):
        tsa_key, tsa_leaf = read_key(inst / "tsa.key"), read_cert(inst / "tsa.pem")
        if v in ("tsa_rsa", "tsa_rsa1024", "v2_tsa_rsa", "v2_tsa_rsa1024"):
            stem = "tsa_rsa1024" if v.endswith("1024") else "tsa_rsa"
            tsa_key, tsa_leaf = read_key(inst / f"{stem}.key"), read_cert(inst / f"{stem}.pem")
        if v in ("tsa_untrusted", "v2_untrusted_timestamp"):
            _, tsa_key, tsa_leaf = make_tsa()
        message = base64.b64decode(sig_b64)
        if v == "tsa_other_message":
            message = b"not this signature: " + message
        ess_alg = "sha1" if v.startswith("tsa_ess_v1") else "sha256"
        embed = True
        if v.endswith("_other_cert"):
            tsa_leaf, embed = twin_certificate(tsa_key, tsa_leaf), False
        with tempfile.TemporaryDirectory() as work:
            tsr = openssl_timestamp(work, tsa_key, tsa_leaf, message, ess_alg, embed)
        timestamps = {"rfc3161Timestamps": [{"signedTimestamp": b64(tsr)}]}
    bundle = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {
            "certificate": {"rawBytes": b64(der(cert))},
            "tlogEntries": [entry],
            "timestampVerificationData": timestamps,
        },
        "dsseEnvelope": envelope,
    }
    sig_out.write_text(json.dumps(bundle, indent=2) + "\n")
    print(f"signed {model_dir} ({v}) into {sig_out}")
    return 0


# ---------------------------------------------------------------- verifying


def cmd_verify(args):
    inst = pathlib.Path(args.instance)
    trust_config = inst / "trust_config.json"
    if not trust_config.is_file():
        raise Misuse(f"no instance at {inst}")
    if args.api:
        return verify_api(args, trust_config)
    cmd = [
        sys.executable, "-m", "model_signing", "verify", "sigstore",
        "--trust_config", str(trust_config),
        "--identity", args.identity,
        "--identity_provider", args.issuer,
        "--signature", args.sig,
        args.model_dir,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode == 0:
        sys.stdout.write(run.stdout)
        return 0
    sys.stderr.write(run.stderr or run.stdout)
    return 1 if run.returncode == 1 else 2


def verify_api(args, trust_config):
    """The CLI's verification through the API, hashing as the signature says.

    helper.py's shims (blake2b name, float shard_size) are applied.
    """
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import helper  # noqa: F401  (patches model_signing's hashing-config guess)
    import model_signing

    try:
        (
            model_signing.verifying.Config()
            .use_sigstore_verifier(
                identity=args.identity, oidc_issuer=args.issuer, trust_config=trust_config
            )
            .verify(args.model_dir, args.sig)
        )
    except Exception as err:  # the verdict is what matters here
        print(f"Verification failed with error: {err}", file=sys.stderr)
        return 1
    print("Verification succeeded")
    return 0


def main(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("instance")
    p.add_argument("out")
    p = sub.add_parser("sign")
    p.add_argument("instance")
    p.add_argument("model_dir")
    p.add_argument("sig_out")
    p.add_argument("--identity", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--variant", default="ok", choices=VARIANTS)
    p.add_argument("--hash", default="sha256", choices=("sha256", "blake2", "blake3"))
    p.add_argument("--time", type=int, help="signing time T, seconds since the epoch")
    p.add_argument("--log-index-offset", type=int, default=0)
    p = sub.add_parser("verify")
    p.add_argument("instance")
    p.add_argument("model_dir")
    p.add_argument("sig")
    p.add_argument("--identity", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--api", action="store_true")
    args = parser.parse_args(argv[1:])  # exits 2 on misuse
    try:
        if args.cmd == "instance":
            return cmd_instance(args.out)
        if args.cmd == "sign":
            return cmd_sign(args)
        return cmd_verify(args)
    except Misuse as err:
        print(f"misuse: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
