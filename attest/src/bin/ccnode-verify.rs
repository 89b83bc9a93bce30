//! ccnode-verify: checks an OpenSSF model signature offline, without the
//! daemon, with the same code ccnoded uses.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ccnode_attest::oms::{self, policy, HandOver, OmsError, TrustPolicy, VerifyOptions};
use clap::{Args, Parser, Subcommand};

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

#[derive(Parser)]
#[command(name = "ccnode-verify", version, about = "Verify model signatures offline", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify an OpenSSF model-signing (OMS) signature over a model directory.
    #[command(after_help = EXIT_CODES)]
    Model(ModelArgs),
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
    let Command::Model(args) = cli.command;
    match run_model(&args) {
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
