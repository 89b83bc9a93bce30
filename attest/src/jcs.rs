//! RFC 8785 JSON Canonicalization Scheme (JCS) over [`serde_json::Value`].
//!
//! - object members sorted by the UTF-16 code units of their names;
//! - strings escaped as ECMAScript's `JSON.stringify` does (only `"`, `\`
//!   and the C0 controls, `\b \t \n \f \r` in short form, the others as
//!   `\u00xx` with lower-case hex; everything else literal UTF-8);
//! - numbers formatted as ECMAScript's `Number.prototype.toString` (via
//!   `ryu-js`), `-0` as `0`;
//! - no whitespace.
//!
//! JCS numbers are IEEE 754 doubles. An integer outside ±2^53 cannot be
//! represented exactly and is refused ([`JcsError::UnsafeInteger`]) rather
//! than silently rounded: a digest over a rounded value would not commit to
//! what the producer meant.

use serde_json::Value;

/// Deepest nesting canonicalised (the input was already bounded by the JSON
/// parser's own recursion limit of 128; this keeps the recursion here
/// bounded whatever built the value).
pub const MAX_DEPTH: usize = 128;

/// Why a value cannot be canonicalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JcsError {
    #[error("integer {0} is outside the exactly representable range of ±2^53")]
    UnsafeInteger(String),
    #[error("number {0} is not finite")]
    NotFinite(String),
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// The canonical serialisation of `value`.
pub fn canonicalize(value: &Value) -> Result<Vec<u8>, JcsError> {
    let mut out = Vec::new();
    write_value(value, &mut out, 0)?;
    Ok(out)
}

/// [`canonicalize`] of any serialisable value.
pub fn canonicalize_serialize<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, JcsError> {
    // A value built from our own types always serialises; a failure here
    // (a map with non-string keys) is reported as not canonicalisable.
    let v = serde_json::to_value(value).map_err(|e| JcsError::NotFinite(e.to_string()))?;
    canonicalize(&v)
}

fn write_value(value: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), JcsError> {
    if depth > MAX_DEPTH {
        return Err(JcsError::TooDeep);
    }
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(n, out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_value(v, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

const MAX_SAFE: u64 = 1 << 53;

fn write_number(n: &serde_json::Number, out: &mut Vec<u8>) -> Result<(), JcsError> {
    if let Some(u) = n.as_u64() {
        if u > MAX_SAFE {
            return Err(JcsError::UnsafeInteger(u.to_string()));
        }
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(i) = n.as_i64() {
        if i.unsigned_abs() > MAX_SAFE {
            return Err(JcsError::UnsafeInteger(i.to_string()));
        }
        out.extend_from_slice(i.to_string().as_bytes());
    } else {
        let f = n
            .as_f64()
            .ok_or_else(|| JcsError::NotFinite(n.to_string()))?;
        write_f64(f, out)?;
    }
    Ok(())
}

/// Formats a double as ECMAScript's `Number.prototype.toString`.
pub fn write_f64(f: f64, out: &mut Vec<u8>) -> Result<(), JcsError> {
    if !f.is_finite() {
        return Err(JcsError::NotFinite(f.to_string()));
    }
    if f == 0.0 {
        // Both +0 and -0.
        out.push(b'0');
        return Ok(());
    }
    let mut buf = ryu_js::Buffer::new();
    out.extend_from_slice(buf.format_finite(f).as_bytes());
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\r' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(bits: u64) -> String {
        let mut out = Vec::new();
        write_f64(f64::from_bits(bits), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// RFC 8785 appendix B: IEEE 754 bit patterns and their JCS form.
    #[test]
    fn rfc8785_number_table() {
        let table: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, want) in table {
            assert_eq!(num(*bits), *want, "bits {bits:#018x}");
        }
        let mut out = Vec::new();
        assert!(write_f64(f64::NAN, &mut out).is_err());
        assert!(write_f64(f64::INFINITY, &mut out).is_err());
    }

    /// RFC 8785 section 3.2.2: the sample input and its canonical form.
    #[test]
    fn rfc8785_sample() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let got = String::from_utf8(canonicalize(&v).unwrap()).unwrap();
        let want = "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}";
        assert_eq!(got, want);
    }

    /// RFC 8785 section 3.2.3: member names sorted by UTF-16 code units
    /// (the emoji's surrogates sort before U+FB33).
    #[test]
    fn rfc8785_sorting() {
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let v: Value = serde_json::from_str(input).unwrap();
        let got = String::from_utf8(canonicalize(&v).unwrap()).unwrap();
        let order: Vec<&str> = got
            .split(['"'])
            .filter(|s| s.contains(' ') || *s == "One" || *s == "Control")
            .collect();
        assert_eq!(
            order,
            [
                "Carriage Return",
                "One",
                "Control",
                "Latin Small Letter O With Diaeresis",
                "Euro Sign",
                "Emoji: Grinning Face",
                "Hebrew Letter Dalet With Dagesh"
            ]
        );
        assert!(got.starts_with("{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":"));
    }

    #[test]
    fn integers_and_bounds() {
        let v = serde_json::json!({"b": [1, -1, 0, 9007199254740992u64], "a": {"z": null, "y": "x\u{1f}"}});
        assert_eq!(
            String::from_utf8(canonicalize(&v).unwrap()).unwrap(),
            r#"{"a":{"y":"x\u001f","z":null},"b":[1,-1,0,9007199254740992]}"#
        );
        let big = serde_json::json!(9007199254740993u64);
        assert!(matches!(
            canonicalize(&big),
            Err(JcsError::UnsafeInteger(_))
        ));
        let neg = serde_json::json!(-9007199254740993i64);
        assert!(matches!(
            canonicalize(&neg),
            Err(JcsError::UnsafeInteger(_))
        ));
        // Nesting bound.
        let mut deep = Value::Null;
        for _ in 0..(MAX_DEPTH + 2) {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(canonicalize(&deep), Err(JcsError::TooDeep));
    }
}
