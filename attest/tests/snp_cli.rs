//! `ccnode-verify snp-report` on the genuine Milan report
//! (tests/fixtures/snp-milan, see its README): the checks it prints, its
//! exit codes (0 pass, 1 a check failed, 4 unreadable input) and `--json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ccnode_attest::tee::snp::certs;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ccnode-verify");
/// Inside the fixture VCEK's validity (2023-04-03 to 2030-04-03).
const AT: &str = "2024-01-01T00:00:00Z";
const MEASUREMENT: &str = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/snp-milan")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `snp-report` with the fixture's report, VCEK and chain, plus `extra`.
fn snp(report: &Path, extra: &[&str]) -> Output {
    let vcek = fixture("vcek_milan.der");
    let chain = fixture("cert_chain_milan");
    let mut args = vec![
        "snp-report",
        "--report",
        report.to_str().unwrap(),
        "--vcek",
        vcek.to_str().unwrap(),
        "--chain",
        chain.to_str().unwrap(),
        "--at",
        AT,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn status_of(v: &Value, check: &str) -> String {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == check)
        .unwrap_or_else(|| panic!("no check {check} in {v}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

fn raw_report() -> Vec<u8> {
    let text = std::fs::read_to_string(fixture("report_milan.hex")).unwrap();
    hex::decode(text.trim()).unwrap()
}

#[test]
fn the_genuine_report_passes() {
    let o = snp(&fixture("report_milan.hex"), &[]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{out}{}", String::from_utf8_lossy(&o.stderr));
    for line in [
        "chain        pass",
        "signature    pass",
        "chip_id      pass",
        "tcb          pass",
    ] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    assert!(out.contains("report_data  skip"), "{out}");
    assert!(out.contains("policy       skip"), "{out}");
    assert!(out.contains("verdict: pass"), "{out}");
    assert!(out.contains("ARK-Milan"), "{out}");

    // --json, the binary form, and no --chain (the built-in ASK).
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("report.bin");
    std::fs::write(&bin, raw_report()).unwrap();
    let vcek = fixture("vcek_milan.der");
    let o = run(&[
        "snp-report",
        "--report",
        bin.to_str().unwrap(),
        "--vcek",
        vcek.to_str().unwrap(),
        "--at",
        AT,
        "--json",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let v = json(&o);
    assert_eq!(v["verdict"], "pass");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "chain",
            "signature",
            "chip_id",
            "tcb",
            "report_data",
            "policy"
        ]
    );
    assert!(v["checks"][0]["message"]
        .as_str()
        .unwrap()
        .contains("built in"));
    assert_eq!(v["report"]["measurement"], MEASUREMENT);
    assert_eq!(v["report"]["version"], 2);
    assert_eq!(v["report"]["generation"], "Milan");
    assert_eq!(v["report"]["reported_tcb"]["microcode"], 115);
}

#[test]
fn report_data_and_policy() {
    let report = fixture("report_milan.hex");
    let data = hex::encode(&raw_report()[0x50..0x90]);
    let o = snp(&report, &["--report-data", &data]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("report_data  pass"));
    // A 32-byte binding is padded with zero bytes: not this report's.
    let o = snp(&report, &["--report-data", &"ab".repeat(32), "--json"]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(v["verdict"], "fail");
    assert_eq!(status_of(&v, "report_data"), "fail");
    assert_eq!(status_of(&v, "signature"), "pass");

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = write(
        "good.toml",
        &format!("allowed_aks = []\n[snp]\nallowed_measurements = [\"{MEASUREMENT}\"]\n[snp.min_tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n"),
    );
    let o = snp(&report, &["--policy", good.to_str().unwrap()]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("policy       pass"));
    for (name, text, needle) in [
        ("other.toml", format!("[snp]\nallowed_measurements = [\"{}\"]\n", "00".repeat(48)), "is not among"),
        ("none.toml", "[snp]\n".to_string(), "lists no allowed_measurements"),
        ("tcb.toml", format!("[snp]\nallowed_measurements = [\"{MEASUREMENT}\"]\nmin_tcb = {{ bootloader = 3, tee = 0, snp = 9, microcode = 115 }}\n"), "min_tcb is 9"),
        ("single.toml", format!("[snp]\nallowed_measurements = [\"{MEASUREMENT}\"]\nrequire_single_socket = true\n"), "single socket"),
    ] {
        let p = write(name, &text);
        let o = snp(&report, &["--policy", p.to_str().unwrap(), "--json"]);
        assert_eq!(code(&o), 1, "{name}: {}", stdout(&o));
        let v = json(&o);
        assert_eq!(status_of(&v, "policy"), "fail", "{name}");
        let msg = v["checks"][5]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    // Unusable policies: exit 4.
    for (name, text) in [
        ("no-snp.toml", "allowed_aks = []\n".to_string()),
        (
            "bad.toml",
            "[snp]\nallowed_measurements = [\"zz\"]\n".to_string(),
        ),
        ("unknown.toml", "[snp]\nfoo = 1\n".to_string()),
    ] {
        let p = write(name, &text);
        let o = snp(&report, &["--policy", p.to_str().unwrap()]);
        assert_eq!(code(&o), 4, "{name}");
    }
}

#[test]
fn tampered_reports_and_wrong_chains_fail() {
    let dir = tempfile::tempdir().unwrap();
    // One byte of the measurement flipped: the signature fails.
    let mut b = raw_report();
    b[0x90] ^= 1;
    let p = dir.path().join("flipped.bin");
    std::fs::write(&p, &b).unwrap();
    let o = snp(&p, &["--json"]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(status_of(&v, "signature"), "fail");
    assert_eq!(status_of(&v, "chain"), "pass");
    // Another chip id: the signature and the chip id fail.
    let mut b = raw_report();
    b[0x1A0] ^= 1;
    let p = dir.path().join("chip.bin");
    std::fs::write(&p, &b).unwrap();
    let v = json(&snp(&p, &["--json"]));
    assert_eq!(status_of(&v, "signature"), "fail");
    assert_eq!(status_of(&v, "chip_id"), "fail");
    assert_eq!(status_of(&v, "tcb"), "pass");
    // Genoa's chain for a Milan VCEK.
    let chain = dir.path().join("genoa.pem");
    std::fs::write(&chain, format!("{}{}", certs::ASK_GENOA, certs::ARK_GENOA)).unwrap();
    let vcek = fixture("vcek_milan.der");
    let report = fixture("report_milan.hex");
    let o = run(&[
        "snp-report",
        "--report",
        report.to_str().unwrap(),
        "--vcek",
        vcek.to_str().unwrap(),
        "--chain",
        chain.to_str().unwrap(),
        "--at",
        AT,
    ]);
    assert_eq!(code(&o), 1);
    let out = stdout(&o);
    assert!(out.contains("chain        FAIL"), "{out}");
    assert!(out.contains("signature    pass"), "{out}");
    assert!(out.contains("verdict: FAIL"), "{out}");
    // An expired VCEK.
    let o = run(&[
        "snp-report",
        "--report",
        report.to_str().unwrap(),
        "--vcek",
        vcek.to_str().unwrap(),
        "--at",
        "2031-01-01T00:00:00Z",
    ]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("not valid now"), "{}", stdout(&o));
}

#[test]
fn unreadable_inputs_exit_4() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\x00\x01 not a report").unwrap();
    let short = dir.path().join("short.hex");
    std::fs::write(&short, "0200").unwrap();
    let report = fixture("report_milan.hex");
    let vcek = fixture("vcek_milan.der");
    let missing = dir.path().join("missing");
    let r = report.to_str().unwrap();
    let v = vcek.to_str().unwrap();
    let long = "00".repeat(65);
    let cases: Vec<Vec<&str>> = vec![
        vec!["--report", missing.to_str().unwrap(), "--vcek", v],
        vec!["--report", garbage.to_str().unwrap(), "--vcek", v],
        vec!["--report", short.to_str().unwrap(), "--vcek", v],
        vec!["--report", r, "--vcek", missing.to_str().unwrap()],
        vec!["--report", r, "--vcek", garbage.to_str().unwrap()],
        vec!["--report", r, "--vcek", r],
        vec![
            "--report",
            r,
            "--vcek",
            v,
            "--chain",
            garbage.to_str().unwrap(),
        ],
        vec!["--report", r, "--vcek", v, "--report-data", "zz"],
        vec!["--report", r, "--vcek", v, "--report-data", &long],
        vec![
            "--report",
            r,
            "--vcek",
            v,
            "--policy",
            missing.to_str().unwrap(),
        ],
    ];
    for extra in cases {
        let mut args = vec!["snp-report"];
        args.extend(extra.iter().copied());
        let o = run(&args);
        assert_eq!(
            code(&o),
            4,
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).starts_with("error: "),
            "{args:?}"
        );
    }
    // --json says why too.
    let o = run(&[
        "snp-report",
        "--report",
        garbage.to_str().unwrap(),
        "--vcek",
        v,
        "--json",
    ]);
    assert_eq!(code(&o), 4);
    assert_eq!(json(&o)["verdict"], "error");
    assert_eq!(json(&o)["error"], "report");
    // Usage errors: 2; --help documents trust and exit codes.
    assert_eq!(code(&run(&["snp-report", "--report", r])), 2);
    let help = stdout(&run(&["snp-report", "--help"]));
    assert!(
        help.contains("Exit codes") && help.contains("built-in ASK"),
        "{help}"
    );
}
