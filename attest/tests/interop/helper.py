"""Drives the reference model_signing tool for ccnode's interop tests.

sign-key MODEL SIG KEY METHOD HASH [SHARD_SIZE]
sign-cert MODEL SIG KEY CERT CHAIN
verify-key MODEL SIG PUB          (API, serialization guessed from the signature)
verify-cert MODEL SIG CHAIN...    (API)
expired-cert KEY ISSUER_PEM ISSUER_KEY OUT   (issues an expired code-signing cert)

The API verifications apply two shims, each working around a bug in
model_signing 1.1.1 that makes it refuse its own signatures (reported in
ccnode's docs/model-signing.md): the signed shard_size is a float
(1000000000.0, from protobuf's Struct) which Python's range() refuses, and
the signed hash_type "blake2b" is not a name its hashing config accepts
("blake2"). Without them the reference verdict on every shards or blake2b
signature is "refused", whatever the model.

Exit status 0 on success, 1 on a refused verification, 2 on misuse.
"""

import pathlib
import sys

import model_signing
from model_signing import verifying

_guess = verifying.Config._guess_hashing_config


class _Shimmed:
    def __init__(self, args):
        self.serialization_type = args


def _guess_shimmed(self, source_manifest):
    args = dict(source_manifest.serialization_type)
    if args.get("hash_type") == "blake2b":
        args["hash_type"] = "blake2"
    if "shard_size" in args:
        args["shard_size"] = int(args["shard_size"])
    return _guess(self, _Shimmed(args))


verifying.Config._guess_hashing_config = _guess_shimmed


def expired_cert(key_path, issuer_pem, issuer_key, out):
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = serialization.load_pem_private_key(pathlib.Path(key_path).read_bytes(), None)
    issuer = x509.load_pem_x509_certificate(pathlib.Path(issuer_pem).read_bytes())
    ikey = serialization.load_pem_private_key(pathlib.Path(issuer_key).read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(ikey, hashes.SHA256())
    )
    pathlib.Path(out).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def hashing_config(method, hash_type, shard_size):
    algo = {"sha256": "sha256", "blake2b": "blake2", "blake3": "blake3"}[hash_type]
    config = model_signing.hashing.Config()
    if method == "files":
        return config.use_file_serialization(hashing_algorithm=algo)
    return config.use_shard_serialization(hashing_algorithm=algo, shard_size=shard_size)


def main(argv):
    if argv[1] == "expired-cert":
        expired_cert(*argv[2:6])
        return 0
    cmd, model, sig = argv[1], pathlib.Path(argv[2]), pathlib.Path(argv[3])
    if cmd == "sign-key":
        key, method, hash_type = argv[4], argv[5], argv[6]
        shard = int(argv[7]) if len(argv) > 7 else 1_000_000_000
        (
            model_signing.signing.Config()
            .use_elliptic_key_signer(private_key=key)
            .set_hashing_config(hashing_config(method, hash_type, shard))
            .sign(model, sig)
        )
        return 0
    if cmd == "sign-cert":
        key, cert, chain = argv[4], argv[5], argv[6]
        (
            model_signing.signing.Config()
            .use_certificate_signer(
                private_key=key, signing_certificate=cert, certificate_chain=[chain]
            )
            .sign(model, sig)
        )
        return 0
    try:
        config = model_signing.verifying.Config()
        if cmd == "verify-key":
            config = config.use_elliptic_key_verifier(public_key=argv[4])
        elif cmd == "verify-cert":
            config = config.use_certificate_verifier(certificate_chain=argv[4:])
        else:
            print(f"unknown command {cmd}", file=sys.stderr)
            return 2
        config.verify(model, sig)
    except Exception as err:  # the verdict is what matters here
        print(f"refused: {err}", file=sys.stderr)
        return 1
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
