//! What several end-to-end test files share: a generated, signed model,
//! and reading one series from a node's /metrics.

#![allow(dead_code)]

use std::path::PathBuf;

use ccnode_testkit::TestNode;
use ccnode_worker::testmodel::{self, Shape};

/// A generated model, signed, with its trust policy.
pub struct Model {
    pub _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub sig: PathBuf,
    pub policy: PathBuf,
}

/// A `shape` model from `seed`, signed in the OMS format with a P-256 key
/// from the same seed, and a trust policy that lets that key sign `name`.
pub fn make_model(name: &str, shape: &Shape, seed: u64) -> Model {
    let tmp = tempfile::Builder::new()
        .prefix("ccnode-model-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    testmodel::write_model(&dir, shape, seed).unwrap();
    let key = ccnode_attest::oms::sign::key_from_seed(seed);
    let bundle = ccnode_attest::oms::sign::sign_dir_p256(&dir, &key, name).unwrap();
    let sig = tmp.path().join("model.sig");
    std::fs::write(&sig, bundle).unwrap();
    let pubkey = tmp.path().join("key.pub.pem");
    ccnode_attest::oms::sign::write_public_key_pem(&pubkey, &key).unwrap();
    let policy = tmp.path().join("trust.toml");
    std::fs::write(
        &policy,
        format!("[[signer]]\nmodels = [\"{name}\"]\npublic_keys = [\"key.pub.pem\"]\n"),
    )
    .unwrap();
    // The worker user reads nothing of this: it gets sealed memfds.
    Model {
        _dir: tmp,
        dir,
        sig,
        policy,
    }
}

/// One sample of `series` (name and labels) from `node`'s /metrics; 0 if
/// it is not there (yet).
pub fn metric(node: &TestNode, series: &str) -> f64 {
    let (_, body) = node.http_get("/metrics");
    ccnode_testkit::bench::metric(&body, series).unwrap_or(0.0)
}
