//! Format checks on verified bytes before they are handed over: pickle-based
//! files are refused (by extension here, by content in [`super::pickle`]),
//! safetensors headers are
//! checked (bounded length, UTF-8 JSON object, no duplicate names, tensors
//! contiguous and inside the file, dtype × shape = byte length, all
//! arithmetic overflow-checked).

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use std::fs::File;

use super::hash::read_full_at;
use super::pickle;
use super::OmsError;

/// Largest safetensors header accepted (the reference implementation's cap).
pub const MAX_HEADER: u64 = 100 << 20;

/// File extensions of pickle-based formats.
const PICKLE_EXTENSIONS: &[&str] = &[".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"];

/// Whether a file name has a pickle-based format's extension.
pub fn is_pickle_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    PICKLE_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
}

fn invalid(path: &str, reason: impl Into<String>) -> OmsError {
    OmsError::Safetensors {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Checks one verified file: its content for a pickle (or a container one
/// may hide in) when it is not `.safetensors`, the header when it is.
pub(crate) fn check_file(name: &str, size: u64, file: &File) -> Result<(), OmsError> {
    let io = |source| OmsError::Io {
        path: name.into(),
        source,
    };
    // Case-folded as the pickle names are: `W.SAFETENSORS` is checked too.
    let is_safetensors = name.to_ascii_lowercase().ends_with(".safetensors");
    if !is_safetensors {
        return match pickle::classify_file(file, size).map_err(io)? {
            Some(refusal) => Err(OmsError::Pickle {
                path: name.to_owned(),
                why: refusal.reason(),
            }),
            None => Ok(()),
        };
    }
    let mut head = [0u8; 8];
    let n = read_full_at(file, &mut head, 0).map_err(io)?;
    if n < 8 {
        return Err(invalid(name, "shorter than the header length"));
    }
    let len = u64::from_le_bytes(head);
    if len > MAX_HEADER {
        return Err(invalid(
            name,
            format!("header length {len} exceeds {MAX_HEADER}"),
        ));
    }
    let data_start = len
        .checked_add(8)
        .filter(|s| *s <= size)
        .ok_or_else(|| invalid(name, "header runs past the end of the file"))?;
    let mut header = vec![0u8; len as usize];
    if read_full_at(file, &mut header, 8).map_err(io)? != header.len() {
        return Err(invalid(name, "short header"));
    }
    check_header(&header, size - data_start).map_err(|reason| invalid(name, reason))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The header's tensors in file order, duplicates detected, each entry
/// read straight into its typed form: no `serde_json::Value` tree, whose
/// nodes would cost many times the header's bytes (a signed 100 MiB
/// header of nested arrays would otherwise take gigabytes).
struct Entries(Vec<(String, TensorInfo)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!(
                            "duplicate tensor name {:?}",
                            short(&k)
                        )));
                    }
                    if k == "__metadata__" {
                        map.next_value::<std::collections::HashMap<String, String>>()
                            .map_err(|e| {
                                de::Error::custom(format!(
                                    "__metadata__ is not a map of strings: {e}"
                                ))
                            })?;
                        continue;
                    }
                    let info = map
                        .next_value::<TensorInfo>()
                        .map_err(|e| de::Error::custom(format!("tensor {:?}: {e}", short(&k))))?;
                    out.push((k, info));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Checks a safetensors header (the JSON after the 8-byte length) against
/// the length of the data section that follows it.
pub fn check_header(header: &[u8], data_len: u64) -> Result<(), String> {
    let text = std::str::from_utf8(header).map_err(|_| "header is not UTF-8".to_string())?;
    if !text.starts_with('{') {
        return Err("header does not start with {".into());
    }
    let entries: Entries =
        serde_json::from_str(text).map_err(|e| format!("invalid header: {e}"))?;
    let mut spans = Vec::new();
    for (name, info) in entries.0 {
        let size = dtype_size(&info.dtype).ok_or_else(|| {
            format!(
                "tensor {:?}: unsupported dtype {:?}",
                short(&name),
                short(&info.dtype)
            )
        })?;
        let elements = info
            .shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| format!("tensor {:?}: shape overflows", short(&name)))?;
        let bytes = elements
            .checked_mul(size)
            .ok_or_else(|| format!("tensor {:?}: size overflows", short(&name)))?;
        let (begin, end) = info.data_offsets;
        if end < begin || end - begin != bytes {
            return Err(format!(
                "tensor {:?}: offsets {begin}..{end} do not hold {bytes} bytes",
                short(&name)
            ));
        }
        spans.push((begin, end, name));
    }
    spans.sort();
    let mut at = 0u64;
    for (begin, end, name) in &spans {
        if *begin != at {
            return Err(format!(
                "tensor {:?} starts at {begin}, expected {at} (gap or overlap)",
                short(name)
            ));
        }
        at = *end;
    }
    if at != data_len {
        return Err(format!(
            "tensors cover {at} bytes, the data section holds {data_len}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_header() {
        let h = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
        check_header(h, 22).unwrap();
        check_header(b"{}", 0).unwrap();
    }

    #[test]
    fn rejects_invalid_headers() {
        let cases: &[(&[u8], u64)] = &[
            (b"", 0),
            (b"[]", 0),
            (b" {}", 0),
            (&[0xff, b'{', b'}'], 0),
            (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8),
            (br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
            (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8),
            (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#, 6),
            (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, 5),
            (br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#, 4),
            (br#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#, 1),
            (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#, 4),
            (br#"{"__metadata__":{"x":1}}"#, 0),
            (br#"{"__metadata__":{"x":{"y":"z"}}}"#, 0),
            (br#"{"__metadata__":{},"__metadata__":{}}"#, 0),
            (br#"{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}"#, 4),
            (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":0}}"#, 4),
            (br#"{"a":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#, 0),
        ];
        for (h, len) in cases {
            assert!(
                check_header(h, *len).is_err(),
                "{}",
                String::from_utf8_lossy(h)
            );
        }
    }

    #[test]
    fn pickle_detection() {
        assert!(is_pickle_name("pytorch_model.bin"));
        assert!(is_pickle_name("x/Model.PT"));
        assert!(!is_pickle_name("model.safetensors"));
    }
}
