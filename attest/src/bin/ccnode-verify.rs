//! ccnode-verify: checks an OpenSSF model signature offline, and a node's
//! attestation evidence (from a file, or fetched fresh from the node with a
//! new nonce), with the same library code ccnoded and remote verifiers use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use ccnode_attest::client;
use ccnode_attest::evidence::{Evidence, MAX_EVIDENCE};
use ccnode_attest::oms::{self, policy, HandOver, OmsError, TrustPolicy, VerifyOptions};
use ccnode_attest::verify::{self, AttestationResult, Status, VerifierPolicy};
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
}

fn exit_code(err: &OmsError) -> u8 {
    match err {
        OmsError::Mismatch { .. }
        | OmsError::Changed(_)
        | OmsError::Symlink(_)
        | OmsError::Entry { .. }
        | OmsError::Pickle(_)
        | OmsError::Safetensors { .. } => 1,
        OmsError::Bundle(_)
        | OmsError::Statement(_)
        | OmsError::SubjectDigest
        | OmsError::KeyHint { .. }
        | OmsError::BadSignature
        | OmsError::Certificate(_)
        | OmsError::Untrusted { .. }
        | OmsError::UnsupportedMethod(_) => 3,
        OmsError::Io { .. }
        | OmsError::TrustMaterial { .. }
        | OmsError::TooLarge { .. }
        | OmsError::Memfd(_) => 4,
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn policy_of(trust: &Trust) -> Result<TrustPolicy, OmsError> {
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
    let policy = policy_of(&args.trust)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        args.dir
            .canonicalize()
            .unwrap_or_else(|_| args.dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
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
                    model.model_name,
                    model.file_count,
                    model.bytes_hashed,
                    model.signer,
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
                eprintln!("error: {}", error_chain(&err));
            }
            ExitCode::from(exit_code(&err))
        }
    }
}
