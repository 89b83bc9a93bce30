//! ccnode-verify: checks an OpenSSF model signature offline, and a node's
//! attestation evidence (from a file, or fetched fresh from the node with a
//! new nonce), with the same library code ccnoded and remote verifiers use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use ccnode_attest::evidence::{Evidence, MAX_EVIDENCE};
use ccnode_attest::oms::{self, policy, HandOver, OmsError, TrustPolicy, VerifyOptions};
use ccnode_attest::tee::snp::{self, EndorsementCert, SnpPolicy};
use ccnode_attest::verify::{self, AttestationResult, Check, Status, VerifierPolicy};
use ccnode_attest::{client, error_chain};
use clap::{Args, Parser, Subcommand};
use rand_core::RngCore as _;

const EXIT_CODES: &str = "\
Exit codes:
  0  verified
  1  the model's files do not match the signature (extra, missing or changed
     files, symlinks, special files, pickle files, bad safetensors headers)
  2  usage error
  3  the signature or its signer is refused (malformed bundle or statement,
     bad signature, key or certificate not trusted for this model)
  4  an input cannot be read or is out of bounds (signature, key,
     certificate, trust configuration, model file)";

const EVIDENCE_EXIT_CODES: &str = "\
Exit codes:
  0  every check passed (verdict pass)
  1  at least one check failed (verdict fail; the table or JSON says which)
  2  usage error
  4  an input cannot be read, is malformed or out of bounds (evidence file,
     verifier policy, nonce)
  5  (attest) the node cannot be reached, or answered with an error";

const SNP_EXIT_CODES: &str = "\
Exit codes:
  0  every check passed
  1  at least one check failed (the table or JSON says which)
  2  usage error
  4  an input cannot be read, is malformed or out of bounds (report,
     certificate, chain, policy, --report-data)

Trust: the chain must end at one of the ARKs built into ccnode-verify
(AMD's roots for Milan, Genoa and Turin). Without --chain the ASK built in
for the VCEK's generation is used (a VLEK's ASVK is not built in: give it
with --chain). Nothing is fetched from the network.";

#[derive(Parser)]
#[command(name = "ccnode-verify", version, about = "Verify model signatures and node attestation evidence offline", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify an OpenSSF model-signing (OMS) signature over a model directory.
    #[command(after_help = EXIT_CODES)]
    Model(ModelArgs),
    /// Verify an evidence document (JSON, as the node's attestation endpoint
    /// returns it) against the nonce it was requested with.
    #[command(after_help = EVIDENCE_EXIT_CODES)]
    Evidence(EvidenceArgs),
    /// Ask a node for fresh evidence (a new random 32-byte nonce) and verify
    /// it.
    #[command(after_help = EVIDENCE_EXIT_CODES)]
    Attest(AttestArgs),
    /// Verify an AMD SEV-SNP attestation report offline: the VCEK (or VLEK)
    /// chain to AMD's pinned root, the report's signature, its chip id and
    /// TCB against the VCEK, and optionally its REPORT_DATA and a policy.
    #[command(name = "snp-report", after_help = SNP_EXIT_CODES)]
    SnpReport(SnpReportArgs),
}

#[derive(Args)]
struct SnpReportArgs {
    /// The attestation report: the 1184 bytes, or their hex (whitespace
    /// allowed).
    #[arg(long, value_name = "FILE")]
    report: PathBuf,
    /// The VCEK (or VLEK) certificate, DER or PEM.
    #[arg(long, value_name = "FILE")]
    vcek: PathBuf,
    /// The ASK (ASVK for a VLEK) then the ARK, PEM, as AMD's KDS serves
    /// cert_chain (the ASK alone is accepted too). The ARK must be a built-in
    /// one. Default: the built-in ASK and ARKs.
    #[arg(long, value_name = "FILE")]
    chain: Option<PathBuf>,
    /// A verifier policy (TOML); its [snp] table is checked against the
    /// report (allowed_measurements, min_tcb, allow_debug, max_vmpl, ...).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// The expected REPORT_DATA, hex, up to 64 bytes (shorter is padded
    /// with zero bytes: a 32-byte ccnode evidence binding gives the
    /// REPORT_DATA ccnoded asks for).
    #[arg(long, value_name = "HEX")]
    report_data: Option<String>,
    /// Print the checks and the report's fields as JSON.
    #[arg(long)]
    json: bool,
    /// Check certificate validity at this time (RFC 3339) instead of now.
    #[arg(long, value_name = "TIME", hide = true, value_parser = humantime::parse_rfc3339_weak)]
    at: Option<SystemTime>,
}

#[derive(Args)]
struct EvidenceArgs {
    /// The evidence document.
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// The nonce the evidence was requested with, hex (16 to 64 bytes).
    #[arg(long, value_name = "HEX")]
    nonce: String,
    /// The verifier policy (TOML; see attest/examples/verifier.toml).
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// Print the attestation result (checks, claims, verdict) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AttestArgs {
    /// The node's attestation endpoint, e.g.
    /// http://127.0.0.1:9861/v1/attestation, or https://... with --ca.
    #[arg(long)]
    url: String,
    /// Trusted root certificates (PEM) for an https:// URL. The server's key
    /// must also be the one the node claims (check tls_binding).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The verifier policy (TOML; see attest/examples/verifier.toml).
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// Print the attestation result (checks, claims, verdict) as JSON.
    #[arg(long)]
    json: bool,
    /// Give up on the node after this long per step (connect, send, each
    /// read), twice that in all.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Also write the evidence received to FILE.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// The model directory.
    dir: PathBuf,
    /// The signature file (a Sigstore bundle written by model_signing).
    #[arg(long, value_name = "FILE")]
    signature: PathBuf,
    #[command(flatten)]
    trust: Trust,
    #[command(flatten)]
    keyless: KeylessIdentity,
    /// The model's id in the trust configuration (default: the directory's name).
    #[arg(long)]
    model_id: Option<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Also copy every file into a sealed memfd as it is hashed, as ccnoded
    /// does before handing a model to a worker (measures that path; the
    /// verdict is the same).
    #[arg(long)]
    sealed_copy: bool,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Trust {
    /// Trust this PEM public key (key signing).
    #[arg(long, value_name = "PEM")]
    public_key: Option<PathBuf>,
    /// Trust certificates chaining to these PEM CA certificates.
    #[arg(long, value_name = "PEM", num_args = 1..)]
    certificate_chain: Vec<PathBuf>,
    /// Trust what this trust configuration file allows.
    #[arg(long, value_name = "FILE")]
    trust_config: Option<PathBuf>,
    /// Trust Sigstore keyless signatures under this trust root (a Sigstore
    /// trusted_root.json, or a client trust config holding one), by the
    /// identity given with --identity and --identity-provider.
    #[arg(long, value_name = "FILE", requires_all = ["identity", "identity_provider"])]
    sigstore_trust_root: Option<PathBuf>,
}

#[derive(Args)]
struct KeylessIdentity {
    /// Keyless: the signer's identity (the certificate's SAN email or URI).
    #[arg(long, requires = "sigstore_trust_root")]
    identity: Option<String>,
    /// Keyless: the OIDC issuer that vouched for --identity.
    #[arg(long, requires = "sigstore_trust_root")]
    identity_provider: Option<String>,
}

fn exit_code(err: &OmsError) -> u8 {
    match err {
        OmsError::Mismatch { .. }
        | OmsError::Changed(_)
        | OmsError::Symlink(_)
        | OmsError::Entry { .. }
        | OmsError::Pickle { .. }
        | OmsError::Safetensors { .. } => 1,
        OmsError::Bundle(_)
        | OmsError::Statement(_)
        | OmsError::SubjectDigest
        | OmsError::KeyHint { .. }
        | OmsError::BadSignature
        | OmsError::Certificate(_)
        | OmsError::TransparencyLog(_)
        | OmsError::Timestamp(_)
        | OmsError::Untrusted { .. }
        | OmsError::SubjectName { .. }
        | OmsError::UnsupportedMethod(_) => 3,
        OmsError::Io { .. }
        | OmsError::TrustMaterial { .. }
        | OmsError::TooLarge { .. }
        | OmsError::Memfd(_) => 4,
    }
}

fn policy_of(trust: &Trust, keyless: &KeylessIdentity) -> Result<TrustPolicy, OmsError> {
    if let Some(root) = &trust.sigstore_trust_root {
        let (Some(identity), Some(issuer)) = (
            keyless.identity.as_ref().filter(|s| !s.is_empty()),
            keyless.identity_provider.as_ref().filter(|s| !s.is_empty()),
        ) else {
            return Err(OmsError::TrustMaterial {
                what: "--sigstore-trust-root".into(),
                reason: "needs a non-empty --identity and --identity-provider".into(),
            });
        };
        return Ok(TrustPolicy::global_sigstore(
            oms::sigstore::TrustedRoot::load(root)?,
            vec![oms::sigstore::Identity {
                identity: identity.clone(),
                issuer: issuer.clone(),
            }],
        ));
    }
    if let Some(key) = &trust.public_key {
        return Ok(TrustPolicy::global_key(policy::load_public_key(key)?));
    }
    if let Some(config) = &trust.trust_config {
        return TrustPolicy::load(config);
    }
    let mut roots = Vec::new();
    for path in &trust.certificate_chain {
        roots.extend(policy::load_certificates(path)?);
    }
    Ok(TrustPolicy::global_roots(roots))
}

fn run_model(args: &ModelArgs) -> Result<(oms::VerifiedModel, f64), OmsError> {
    let policy = policy_of(&args.trust, &args.keyless)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        args.dir
            .canonicalize()
            .unwrap_or_else(|_| args.dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    // Failing to raise it only matters for a model with very many files,
    // which then fails with a clear EMFILE naming the file.
    let _ = oms::raise_open_file_limit();
    let start = Instant::now();
    let hand_over = if args.sealed_copy {
        HandOver::SealedCopy
    } else {
        HandOver::VerdictOnly
    };
    let model = oms::verify_model_with(
        &args.dir,
        &args.signature,
        &policy,
        &VerifyOptions::new(model_id),
        hand_over,
    )?;
    Ok((model, start.elapsed().as_secs_f64()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Model(args) => model_main(&args),
        Command::Evidence(args) => evidence_main(&args),
        Command::Attest(args) => attest_main(&args),
        Command::SnpReport(args) => snp_main(&args),
    }
}

/// A failure before any check ran: (exit code, stable label, message).
struct Failure(u8, &'static str, String);

fn fail_out(json: bool, f: Failure) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({"verdict": "error", "error": f.1, "message": f.2})
        );
    } else {
        eprintln!("error: {}", f.2);
    }
    ExitCode::from(f.0)
}

fn load_policy(path: &Path) -> Result<VerifierPolicy, Failure> {
    VerifierPolicy::load(path).map_err(|e| Failure(4, "policy", error_chain(&e)))
}

fn parse_evidence(bytes: &[u8]) -> Result<Evidence, Failure> {
    Evidence::from_json(bytes).map_err(|e| Failure(4, "evidence", error_chain(&e)))
}

fn report(result: &AttestationResult, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(result).unwrap_or_default()
        );
    } else {
        println!("{:<20} {:<6} DETAIL", "CHECK", "RESULT");
        for c in &result.checks {
            let status = match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            println!("{:<20} {:<6} {}", c.name, status, c.message);
        }
        println!(
            "verdict: {} (node {:?}, state {}, AK sha256 {})",
            if result.passed() { "pass" } else { "FAIL" },
            result.claims.node_id,
            result.claims.node_state,
            result.ak_spki_sha256
        );
    }
    if result.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn evidence_main(args: &EvidenceArgs) -> ExitCode {
    let run = || -> Result<AttestationResult, Failure> {
        let nonce = hex::decode(args.nonce.trim())
            .map_err(|_| Failure(4, "nonce", format!("nonce {:?} is not hex", args.nonce)))?;
        let policy = load_policy(&args.policy)?;
        let bytes = oms_read(&args.file)?;
        let evidence = parse_evidence(&bytes)?;
        Ok(verify::verify(
            &evidence,
            &nonce,
            &policy,
            SystemTime::now(),
        ))
    };
    match run() {
        Ok(result) => report(&result, args.json),
        Err(f) => fail_out(args.json, f),
    }
}

/// `snp-report`: each check reported on its own, so one failure does not
/// hide the others.
fn snp_main(args: &SnpReportArgs) -> ExitCode {
    match snp_checks(args) {
        Ok((checks, report)) => {
            let passed = checks.iter().all(|c| c.status != Status::Fail);
            if args.json {
                let out = serde_json::json!({
                    "verdict": if passed { "pass" } else { "fail" },
                    "checks": checks,
                    "report": report.to_json(),
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                println!("{:<12} {:<6} DETAIL", "CHECK", "RESULT");
                for c in &checks {
                    let status = match c.status {
                        Status::Pass => "pass",
                        Status::Fail => "FAIL",
                        Status::Skip => "skip",
                    };
                    println!("{:<12} {:<6} {}", c.name, status, c.message);
                }
                println!(
                    "verdict: {} (SEV-SNP report v{}, VMPL {}, measurement {})",
                    if passed { "pass" } else { "FAIL" },
                    report.version,
                    report.vmpl,
                    hex::encode(report.measurement)
                );
            }
            if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(f) => fail_out(args.json, f),
    }
}

fn snp_checks(args: &SnpReportArgs) -> Result<(Vec<Check>, snp::SnpReport), Failure> {
    let input = |what: &'static str| move |e: snp::SnpError| Failure(4, what, e.to_string());
    let report =
        snp::report_from_file_bytes(&read_small(&args.report)?).map_err(input("report"))?;
    let ek = EndorsementCert::from_bytes(&read_small(&args.vcek)?).map_err(input("vcek"))?;
    let (ask, ark) = match &args.chain {
        Some(path) => snp::split_chain(&read_small(path)?).map_err(input("chain"))?,
        None => (None, None),
    };
    let policy = match &args.policy {
        None => None,
        Some(path) => {
            let text = String::from_utf8(read_small(path)?)
                .map_err(|_| Failure(4, "policy", format!("{} is not UTF-8", path.display())))?;
            let p = SnpPolicy::from_verifier_toml(&text)
                .map_err(|e| Failure(4, "policy", format!("{}: {e}", path.display())))?
                .ok_or_else(|| {
                    Failure(
                        4,
                        "policy",
                        format!("{} has no [snp] table", path.display()),
                    )
                })?;
            Some(p)
        }
    };
    let expected_data = match &args.report_data {
        None => None,
        Some(h) => {
            let v = hex::decode(h.trim())
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 64)
                .ok_or_else(|| {
                    Failure(
                        4,
                        "report_data",
                        format!("--report-data {h:?} is not 1 to 64 bytes of hex"),
                    )
                })?;
            let mut d = [0u8; 64];
            d[..v.len()].copy_from_slice(&v);
            Some(d)
        }
    };

    let mut checks = Vec::new();
    let mut push = |name: &'static str, r: Result<String, String>| {
        let (status, message) = match r {
            Ok(m) => (Status::Pass, m),
            Err(m) => (Status::Fail, m),
        };
        checks.push(Check {
            name,
            status,
            message,
        });
    };
    let now = args.at.unwrap_or_else(SystemTime::now);
    let chain = snp::verify_chain(&ek, ask.as_deref(), ark.as_deref(), now);
    push(
        "chain",
        chain
            .as_ref()
            .map(|c| c.describe(&ek))
            .map_err(ToString::to_string),
    );
    // Decode the TCBs for the chain's generation (else the VCEK's, else as
    // parsed).
    let generation = chain
        .as_ref()
        .ok()
        .map(|c| c.generation)
        .or_else(|| ek.generation());
    let (report, generation_err) = match generation.map(|g| report.for_generation(g)) {
        Some(Ok(r)) => (r, None),
        Some(Err(e)) => (report, Some(e.to_string())),
        None => (report, None),
    };
    push(
        "signature",
        snp::verify_signature(&report, &ek)
            .map(|()| {
                format!(
                    "ECDSA P-384 SHA-384 over bytes 0x000..0x2A0 verifies with the {}",
                    ek.kind.name()
                )
            })
            .map_err(|e| e.to_string()),
    );
    push(
        "chip_id",
        snp::check_chip_id(&report, &ek).map_err(|e| e.to_string()),
    );
    push(
        "tcb",
        match generation_err {
            Some(e) => Err(e),
            None => snp::check_tcb(&report, &ek).map_err(|e| e.to_string()),
        },
    );
    match expected_data {
        None => checks.push(Check {
            name: "report_data",
            status: Status::Skip,
            message: format!(
                "not checked (no --report-data): {}",
                hex::encode(report.report_data)
            ),
        }),
        Some(d) if d == report.report_data => checks.push(Check {
            name: "report_data",
            status: Status::Pass,
            message: format!("REPORT_DATA is {}", hex::encode(d)),
        }),
        Some(d) => checks.push(Check {
            name: "report_data",
            status: Status::Fail,
            message: format!(
                "REPORT_DATA is {}, expected {}",
                hex::encode(report.report_data),
                hex::encode(d)
            ),
        }),
    }
    match &policy {
        None => checks.push(Check {
            name: "policy",
            status: Status::Skip,
            message: "not checked (no --policy)".into(),
        }),
        Some(p) => {
            let r = snp::check_policy(&report, p).map_err(|e| e.to_string());
            let (status, message) = match r {
                Ok(m) => (Status::Pass, m),
                Err(m) => (Status::Fail, m),
            };
            checks.push(Check {
                name: "policy",
                status,
                message,
            });
        }
    }
    Ok((checks, report))
}

/// Reads a small input file (report, certificate, chain, policy).
fn read_small(path: &Path) -> Result<Vec<u8>, Failure> {
    use std::io::Read as _;
    const MAX: u64 = 1 << 20;
    let file = std::fs::File::open(path)
        .map_err(|e| Failure(4, "io", format!("cannot read {}: {e}", path.display())))?;
    let mut buf = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure(4, "io", format!("cannot read {}: {e}", path.display())))?;
    if buf.len() as u64 > MAX {
        return Err(Failure(
            4,
            "too_large",
            format!("{} exceeds {MAX} bytes", path.display()),
        ));
    }
    Ok(buf)
}

fn oms_read(path: &Path) -> Result<Vec<u8>, Failure> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| Failure(4, "io", format!("cannot read {}: {e}", path.display())))?;
    let mut buf = Vec::new();
    file.take(MAX_EVIDENCE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Failure(4, "io", format!("cannot read {}: {e}", path.display())))?;
    if buf.len() > MAX_EVIDENCE {
        return Err(Failure(
            4,
            "too_large",
            format!("{} exceeds {MAX_EVIDENCE} bytes", path.display()),
        ));
    }
    Ok(buf)
}

fn attest_main(args: &AttestArgs) -> ExitCode {
    let run = || -> Result<AttestationResult, Failure> {
        let policy = load_policy(&args.policy)?;
        let mut nonce = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut nonce);
        let roots = args
            .ca
            .as_deref()
            .map(client::load_roots)
            .transpose()
            .map_err(|e| Failure(4, "io", error_chain(&e)))?;
        let fetched = client::fetch(&args.url, &nonce, args.timeout, roots.as_ref())
            .map_err(|e| Failure(5, "fetch", error_chain(&e)))?;
        let bytes = fetched.body;
        if let Some(path) = &args.save {
            std::fs::write(path, &bytes)
                .map_err(|e| Failure(4, "io", format!("cannot write {}: {e}", path.display())))?;
        }
        let evidence = parse_evidence(&bytes)?;
        let mut result = verify::verify(&evidence, &nonce, &policy, SystemTime::now());
        if let Some(spki) = &fetched.tls_spki_sha256 {
            verify::check_tls_binding(&mut result, spki);
        }
        Ok(result)
    };
    match run() {
        Ok(result) => report(&result, args.json),
        Err(f) => fail_out(args.json, f),
    }
}

fn model_main(args: &ModelArgs) -> ExitCode {
    match run_model(args) {
        Ok((model, seconds)) => {
            if args.json {
                let out = serde_json::json!({
                    "verified": true,
                    "model": model.model_name,
                    "manifest_digest": model.manifest_digest,
                    "signer": model.signer,
                    "files": model.file_count,
                    "bytes_hashed": model.bytes_hashed,
                    "seconds": seconds,
                });
                println!("{out}");
            } else {
                println!(
                    "verified: model {} ({} files, {} bytes) signed by {}\nmanifest digest sha256:{}",
                    oms::printable(&model.model_name),
                    model.file_count,
                    model.bytes_hashed,
                    oms::printable(&model.signer),
                    model.manifest_digest
                );
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            if args.json {
                let out = serde_json::json!({
                    "verified": false,
                    "error": err.kind(),
                    "message": error_chain(&err),
                });
                println!("{out}");
            } else {
                eprintln!("error: {}", oms::printable(&error_chain(&err)));
            }
            ExitCode::from(exit_code(&err))
        }
    }
}
