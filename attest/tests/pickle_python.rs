//! The pickle recogniser against what Python really writes: every protocol
//! (0 to 5) of several objects, the compressors and archives pickles travel
//! in, and the JSON and text files a model directory holds, all made by the
//! interpreter of the test virtual environment (found as in oms_interop.rs).
//! Nothing is ever unpickled.

mod common;

use std::fs;
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
}
for name, text in texts.items():
    with open(os.path.join(out, f"text-{name}"), "w", encoding="utf-8") as f:
        f.write(text)
"##;

#[test]
fn what_python_writes_is_classified() {
    let Some(venv) = common::venv() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(WRITE_SAMPLES)
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success());
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
    // Five objects in six protocols, eight containers, ten texts: the
    // script ran to the end.
    assert_eq!(seen, [30, 8, 10]);
}
