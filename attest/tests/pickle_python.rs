//! The pickle recogniser against what Python really writes and reads:
//! every protocol (0 to 5) of several objects, the compressors and archives
//! pickles travel in, the JSON and text files a model directory holds; and
//! thousands of generated opcode streams judged by CPython's own (C)
//! unpickler, whose every name lookup returns a recorder instead of
//! importing anything, so nothing a stream names ever runs. Every stream
//! that CPython reads to STOP, or in which it calls what it looked up,
//! must be refused.
//!
//! The interpreter is the test virtual environment's (as in
//! oms_interop.rs) or else `python3` on PATH.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use ccnode_attest::oms::pickle::{classify, Refusal};

/// Writes the samples into `dir`: `pickle-*` and `container-*` files must be
/// refused, `text-*` files kept.
const WRITE_SAMPLES: &str = r##"
import bz2, collections, gzip, io, json, lzma, os, pickle, sys, tarfile, zipfile, zlib

out = sys.argv[1]

class Payload:
    def __reduce__(self):
        return (os.system, ("true",))

class Tensor:
    def __init__(self):
        self.shape = (2, 3)
        self.data = bytes(24)

objects = {
    "reduce": Payload(),
    "data": {"a": [1, 2.5, "x", None, True], "b": (b"\x00\x01", 2**70)},
    "ordered": collections.OrderedDict([("w", [0.0] * 8), ("b", [1.0])]),
    "instance": Tensor(),
    "int": 7,
}
for name, obj in objects.items():
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        with open(os.path.join(out, f"pickle-{name}-{proto}"), "wb") as f:
            pickle.dump(obj, f, protocol=proto)

blob = pickle.dumps(objects["ordered"], protocol=0)
for name, data in {
    "gzip": gzip.compress(blob),
    "bz2": bz2.compress(blob),
    "xz": lzma.compress(blob),
    "zlib": zlib.compress(blob),
    "zlib9": zlib.compress(blob, 9),
    "zlib1": zlib.compress(blob, 1),
}.items():
    with open(os.path.join(out, f"container-{name}"), "wb") as f:
        f.write(data)
zbuf = io.BytesIO()
with zipfile.ZipFile(zbuf, "w") as z:
    z.writestr("archive/data.pkl", blob)
with open(os.path.join(out, "container-zip"), "wb") as f:
    f.write(zbuf.getvalue())
tbuf = io.BytesIO()
with tarfile.open(fileobj=tbuf, mode="w") as t:
    info = tarfile.TarInfo("pickle")
    info.size = len(blob)
    t.addfile(info, io.BytesIO(blob))
with open(os.path.join(out, "container-tar"), "wb") as f:
    f.write(tbuf.getvalue())
# A v7 tar (no magic), as old tools write it: tarfile still reads it.
v7 = bytearray(tbuf.getvalue())
v7[257:265] = bytes(8)
v7[148:156] = b" " * 8
v7[148:156] = b"%06o\0 " % sum(v7[:512])
assert tarfile.open(fileobj=io.BytesIO(bytes(v7))).getnames() == ["pickle"]
with open(os.path.join(out, "container-tar-v7"), "wb") as f:
    f.write(bytes(v7))
# joblib's lzma compressor writes the .lzma ("alone") format.
with open(os.path.join(out, "container-lzma"), "wb") as f:
    f.write(lzma.compress(blob, format=lzma.FORMAT_ALONE))
# zlib with smaller windows.
for wbits in (9, 12):
    c = zlib.compressobj(wbits=wbits)
    with open(os.path.join(out, f"container-zlib-w{wbits}"), "wb") as f:
        f.write(c.compress(blob) + c.flush())
# A zip preceded by other bytes: zipfile (and PyTorch) find it from its end.
prefixed = b"not a zip header " * 4 + zbuf.getvalue()
assert zipfile.ZipFile(io.BytesIO(prefixed)).namelist() == ["archive/data.pkl"]
with open(os.path.join(out, "container-zip-prefixed"), "wb") as f:
    f.write(prefixed)

texts = {
    "config": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}),
    "config-indented": json.dumps({"vocab_size": 256, "rope_theta": 10000.0}, indent=2),
    "list": json.dumps([1, 2, 3]),
    "tokenizer": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}),
    "readme": "---\nlicense: mit\n---\n\n# Tiny model\n\nRandom weights.\n",
    "license": "MIT License\n\nCopyright (c) 2026 Example\n",
    "rst": ".. title\n\nA model.\n",
    "merges": "#version: 0.2\nh e\nl l\n",
    "vocab": "[PAD]\n[UNK]\nthe\n",
    "python": "import torch\nprint(1)\n",
    "version": "1.0.0\n",
    "labels": "airplane\nautomobile\nbird\n",
    "requirements": "accelerate\ntorch\ntransformers\n",
    "csv": "id,label\n0,cat\n",
    "fraction": "0.5\n",
}
for name, text in texts.items():
    with open(os.path.join(out, f"text-{name}"), "w", encoding="utf-8") as f:
        f.write(text)
"##;

/// Writes `streams.json` into the directory given: `[[hex, verdict], ...]`
/// with verdict `call` (CPython called what it looked up), `stop` (read to
/// STOP), or `error` (stopped by an error first).
const JUDGE_STREAMS: &str = r##"
import io, json, os, pickle, random, sys

class Judge(pickle.Unpickler):
    """CPython's C unpickler, with every lookup answered by a recorder."""
    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self.called = False

    def find_class(self, module, name):
        # What an import or attribute lookup could resolve at all.
        for part in module.split(".") + name.split("."):
            if not part.isidentifier():
                raise pickle.UnpicklingError("no such name")
        judge = self
        class Recorder:
            def __new__(cls, *args, **kwargs):
                judge.called = True
                return object.__new__(cls)
            def __init__(self, *args, **kwargs):
                pass
            def __setstate__(self, state):
                judge.called = True
        return Recorder

def verdict(data):
    j = Judge(data)
    try:
        j.load()
        return "call" if j.called else "stop"
    except Exception:
        return "call" if j.called else "error"

# Single opcodes with well-formed arguments, and some bytes that are none.
# (No FRAME: CPython can take minutes on some streams with one.)
tokens = [
    b"N", b"(", b")", b"]", b"}", b"t", b"l", b"d", b"a", b"e", b"s", b"u",
    b"0", b"1", b"2", b"R", b"b", b"o", b".", b"\x81", b"\x92", b"\x93",
    b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"\x8f", b"\x90", b"\x91",
    b"\x94", b"I7\n", b"I\x00\n", b"I 3\n", b"L12L\n", b"F1.5\n", b"S'x'\n",
    b"Vabc\n", b"V\x00\n", b"K\x05", b"M\x01\x00", b"J\x01\x00\x00\x00",
    b"G" + bytes(8), b"U\x03abc", b"X\x03\x00\x00\x00abc", b"C\x02ab",
    b"B\x01\x00\x00\x00a", b"\x8c\x02os", b"\x8c\x06system", b"p0\n", b"p-0\n",
    b"g0\n", b"q\x00", b"h\x00", b"r\x01\x00\x00\x00", b"j\x01\x00\x00\x00",
    b"cos\nsystem\n", b"ibuiltins\nlist\n", b"c os\nsystem\n", b"\x80\x02",
    b"\x80\x07", b"\x8a\x01\x05", b"\x8b\x01\x00\x00\x00\x05",
    b" ", b"\n", b"x", b"Q", b"Pid\n", b"\x82\x01",
]
pushes = [b"N", b")", b"]", b"}", b"I7\n", b"K\x05", b"Vabc\n", b"\x8c\x02os",
          b"cos\nsystem\n", b"S'x'\n", b"\x88", b"cos\nsystem\n"]  # GLOBAL twice: more calls

def stream(rng):
    """Mostly what a stack of the right depth takes, so that many streams
    get far; some noise, so that many do not."""
    out, depth, marks = [], 0, []
    for _ in range(rng.randint(1, 14)):
        if rng.random() < 0.1:
            out.append(rng.choice(tokens))
            continue
        options = [(p, 1, None) for p in pushes] + [(b"(", 0, "mark")]
        if depth >= 1:
            options += [(b"0", -1, None), (b"2", 1, None), (b"p0\n", 0, None),
                        (b"\x94", 0, None), (b"\x85", 0, None), (b".", -1, None)]
        if depth >= 2:
            options += [(b"R", -1, None), (b"b", -1, None), (b"\x81", -1, None),
                        (b"\x93", -1, None), (b"a", -1, None), (b"\x86", -1, None)]
        if depth >= 3:
            options += [(b"s", -2, None), (b"\x92", -2, None), (b"\x87", -2, None)]
        if marks:
            options += [(b"t", 0, "close"), (b"l", 0, "close"), (b"1", 0, "drop"),
                        (b"ibuiltins\nlist\n", 0, "close"), (b"o", 0, "close")]
            if marks[-1] >= 1:
                options += [(b"e", 0, "extend")]
        token, delta, marking = rng.choice(options)
        out.append(token)
        if marking == "mark":
            marks.append(depth)
        elif marking in ("close", "drop", "extend"):
            depth = marks.pop() + (1 if marking == "close" else 0)
        else:
            depth = max(0, depth + delta)
        if token == b".":
            break
    return b"".join(out)

rng = random.Random(20261207)
streams = []
for _ in range(10000):
    data = stream(rng)
    streams.append([data.hex(), verdict(data)])
with open(os.path.join(sys.argv[1], "streams.json"), "w") as f:
    json.dump(streams, f)
"##;

/// The interpreter: the test environment's, else `python3` on PATH; `None`
/// (a skip, or under CI a failure) when neither runs.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("CCNODE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
        .join("bin/python");
    for candidate in [venv, PathBuf::from("python3")] {
        if Command::new(&candidate)
            .arg("-c")
            .arg("pass")
            .status()
            .is_ok_and(|s| s.success())
        {
            return Some(candidate);
        }
    }
    let msg = "no Python interpreter (the test virtual environment's, or python3 on PATH)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// Runs `script` with a fresh directory as its argument, and returns the
/// directory with what it wrote; `None` without an interpreter.
fn run_script(script: &str) -> Option<tempfile::TempDir> {
    let python = python()?;
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
    Some(tmp)
}

#[test]
fn every_stream_cpython_reads_to_a_call_or_stop_is_refused() {
    let Some(tmp) = run_script(JUDGE_STREAMS) else {
        return;
    };
    let streams: Vec<(String, String)> =
        serde_json::from_slice(&fs::read(tmp.path().join("streams.json")).unwrap()).unwrap();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (hex, verdict) in &streams {
        let bytes = hex::decode(hex).unwrap();
        let refused = classify(&bytes).is_some();
        *counts.entry(verdict.as_str()).or_default() += 1;
        match verdict.as_str() {
            "call" | "stop" => assert!(
                refused,
                "CPython says {verdict}, kept: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            "error" => {}
            other => panic!("verdict {other}"),
        }
    }
    // Each kind of verdict is well represented: the streams exercise the
    // calls, the stops and the errors.
    for kind in ["call", "stop", "error"] {
        assert!(counts.get(kind).copied().unwrap_or(0) >= 100, "{counts:?}");
    }
}

#[test]
fn what_python_writes_is_classified() {
    let Some(tmp) = run_script(WRITE_SAMPLES) else {
        return;
    };
    let mut seen = [0usize; 3];
    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for name in names {
        let verdict = classify(&fs::read(tmp.path().join(&name)).unwrap());
        if name.starts_with("pickle-") {
            seen[0] += 1;
            let proto: u8 = name.rsplit('-').next().unwrap().parse().unwrap();
            let expected = if proto >= 2 {
                Refusal::PickleHeader
            } else {
                Refusal::PickleOpcodes
            };
            assert_eq!(verdict, Some(expected), "{name}");
        } else if name.starts_with("container-") {
            seen[1] += 1;
            assert!(
                matches!(verdict, Some(Refusal::Container(_))),
                "{name}: {verdict:?}"
            );
        } else {
            seen[2] += 1;
            assert_eq!(verdict, None, "{name}");
        }
    }
    // Five objects in six protocols, thirteen containers, fifteen texts:
    // the script ran to the end.
    assert_eq!(seen, [30, 13, 15]);
}
