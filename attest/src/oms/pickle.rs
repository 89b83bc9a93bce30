//! Recognising pickle-based files by their bytes, whatever they are named.
//!
//! File names with a pickle format's extension are refused before hashing
//! ([`super::safetensors::is_pickle_name`]). After hashing, every file that
//! is not `.safetensors` is classified here, on the verified bytes:
//!
//! - **pickle streams of any protocol.** Protocols 2 to 5 begin with PROTO
//!   (`0x80 n`). Protocols 0 and 1 have no header, so the bytes from offset
//!   0 are run through an opcode scanner: the unpickler executes opcodes as
//!   it reads them, so what matters is not whether the stream is complete
//!   but whether its well-formed prefix can call something, that is, holds
//!   an opcode that fetches a callable (GLOBAL, STACK_GLOBAL, EXT*) and then
//!   one that calls (REDUCE, BUILD, OBJ, NEWOBJ*), or INST, which does both.
//!   A prefix that reaches STOP is a pickle too, as is one still
//!   well-formed after [`MAX_OPCODES`] opcodes. Line arguments are checked
//!   for the shape the unpickler needs (digits for INT, a quoted string for
//!   STRING, names without spaces for GLOBAL), so text fails within a few
//!   bytes: `{`, `[`, `#`, space and newline are not opcodes.
//! - **containers a pickle hides in**: zip (PyTorch's format, numpy's
//!   `.npz`), tar (PyTorch's legacy format), and gzip, zlib, bzip2, xz, zstd,
//!   lz4 and 7z streams (joblib compresses its pickles). The worker can use
//!   none of them; a model ships safetensors and plain JSON or text.
//! - **numpy `.npy` arrays of dtype object**, which numpy stores pickled.
//!
//! A refusal is never a verdict on the file's safety beyond "not a format
//! the worker loads, and one that may run code when something else does".

use std::fs::File;
use std::io;

use super::hash::read_full_at;

/// Opcodes scanned before a still well-formed stream is called a pickle.
pub const MAX_OPCODES: usize = 1 << 16;

/// Longest line argument (protocol 0) scanned before the stream is called a
/// pickle: a line that long is still one the unpickler would read.
pub const MAX_LINE: usize = 1 << 20;

/// Why a file's bytes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A pickle stream with a protocol 2–5 header.
    PickleHeader,
    /// A headerless (protocol 0 or 1) pickle stream that can call code or
    /// reaches STOP.
    PickleOpcodes,
    /// An archive or compressed stream; the name says which.
    Container(&'static str),
    /// A numpy array of dtype object (stored pickled), or an `.npy` header
    /// that cannot be read.
    NumpyObject,
}

impl Refusal {
    /// Human-readable reason, for the error message.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PickleHeader => "pickle stream (protocol 2-5 header)",
            Refusal::PickleOpcodes => "pickle stream (protocol 0/1 opcodes)",
            Refusal::Container(kind) => kind,
            Refusal::NumpyObject => "numpy array of dtype object (stored pickled)",
        }
    }
}

/// Random access to the bytes being classified.
trait Source {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

struct SizedFile<'a> {
    file: &'a File,
    size: u64,
}

impl Source for SizedFile<'_> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let want = usize::try_from(self.size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        read_full_at(self.file, &mut buf[..want], offset)
    }
}

/// Classifies in-memory bytes (tests, fuzzing).
pub fn classify(bytes: &[u8]) -> Option<Refusal> {
    classify_source(bytes).unwrap_or(None)
}

/// Classifies a verified file of `size` bytes.
pub(crate) fn classify_file(file: &File, size: u64) -> io::Result<Option<Refusal>> {
    classify_source(&SizedFile { file, size })
}

fn classify_source(src: &(impl Source + ?Sized)) -> io::Result<Option<Refusal>> {
    let mut head = [0u8; 512];
    let n = src.read_at(&mut head, 0)?;
    let head = &head[..n];
    if let Some(kind) = container(head) {
        return Ok(Some(Refusal::Container(kind)));
    }
    if head.starts_with(b"\x93NUMPY") {
        return numpy(src).map(|object| object.then_some(Refusal::NumpyObject));
    }
    if matches!(head, [0x80, 2..=5, ..]) {
        return Ok(Some(Refusal::PickleHeader));
    }
    Ok(Scanner::new(src)
        .is_pickle()?
        .then_some(Refusal::PickleOpcodes))
}

/// The archive or compression format `head` begins with, if any.
fn container(head: &[u8]) -> Option<&'static str> {
    const MAGIC: &[(&[u8], &str)] = &[
        (
            b"PK\x03\x04",
            "zip archive (PyTorch's format holds a pickle)",
        ),
        (b"PK\x05\x06", "zip archive (empty)"),
        (b"\x1f\x8b", "gzip stream"),
        (b"\xfd7zXZ\x00", "xz stream"),
        (b"\x28\xb5\x2f\xfd", "zstd stream"),
        (b"\x04\x22\x4d\x18", "lz4 frame"),
        (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    ];
    for (magic, kind) in MAGIC {
        if head.starts_with(magic) {
            return Some(kind);
        }
    }
    if let [b'B', b'Z', b'h', b'1'..=b'9', ..] = head {
        return Some("bzip2 stream");
    }
    // zlib (joblib's default compressor), with the four headers zlib
    // writes: deflate, a 32 KiB window, no preset dictionary, each level
    // class. (Other valid headers would catch text: `80`, `x `.)
    if let [0x78, 0x01 | 0x5e | 0x9c | 0xda, ..] = head {
        return Some("zlib stream");
    }
    if head.get(257..262) == Some(b"ustar") {
        return Some("tar archive (PyTorch's legacy format holds pickles)");
    }
    None
}

/// Whether an `.npy` file's dtype may hold objects. Fails closed: a header
/// that cannot be read counts as object.
fn numpy(src: &(impl Source + ?Sized)) -> io::Result<bool> {
    // Magic (6), version (2), header length (2 bytes in 1.0, 4 in 2.0/3.0).
    let mut fixed = [0u8; 12];
    let n = src.read_at(&mut fixed, 0)?;
    let (len, start) = match (fixed.get(6), n) {
        (Some(1), 10..) => (u64::from(u16::from_le_bytes([fixed[8], fixed[9]])), 10),
        (Some(2 | 3), 12..) => (
            u64::from(u32::from_le_bytes([
                fixed[8], fixed[9], fixed[10], fixed[11],
            ])),
            12,
        ),
        _ => return Ok(true),
    };
    // numpy itself refuses headers over 10 000 bytes unless told otherwise.
    if len > 1 << 16 {
        return Ok(true);
    }
    let mut header = vec![0u8; len as usize];
    if src.read_at(&mut header, start)? != header.len() {
        return Ok(true);
    }
    // The dtype object is `O` in every spelling numpy writes (`'|O'`, `'O'`,
    // `('f', 'O')` in a record): an `O` closing a quoted type string.
    Ok(header
        .windows(2)
        .any(|w| w[0] == b'O' && matches!(w[1], b'\'' | b'"' | b'0'..=b'9')))
}

/// How an opcode's argument is encoded.
#[derive(Clone, Copy)]
enum Arg {
    None,
    /// Fixed number of bytes.
    Fixed(u8),
    /// A little-endian length of this many bytes, then that many bytes.
    Counted(u8),
    /// One newline-terminated line of this shape.
    Line(Line),
    /// Two lines of module and name (GLOBAL, INST).
    Names,
}

#[derive(Clone, Copy)]
enum Line {
    /// An integer as Python's `int()` reads it (INT, LONG, PUT, GET).
    Int,
    Float,
    /// A quoted string literal (STRING).
    Quoted,
    /// Anything (UNICODE, PERSID).
    Any,
}

/// What an opcode does, as far as calling code goes.
#[derive(Clone, Copy, PartialEq)]
enum Effect {
    Data,
    /// Pushes a callable found by name (GLOBAL, STACK_GLOBAL, EXT*).
    Fetch,
    /// Calls something on the stack (REDUCE, BUILD, OBJ, NEWOBJ, NEWOBJ_EX).
    Call,
    /// INST: fetches and calls.
    FetchCall,
    Stop,
}

/// Every opcode of pickle protocols 0 to 5 (CPython's `pickletools`).
fn opcode(op: u8) -> Option<(Arg, Effect)> {
    use Arg::*;
    use Effect::*;
    Some(match op {
        b'(' | b'0' | b'1' | b'2' | b'N' | b'Q' | b'a' | b'd' | b'}' | b'e' | b'l' | b']'
        | b's' | b't' | b')' | b'u' => (None, Data),
        0x85..=0x89 | 0x8f..=0x91 | 0x94 | 0x97 | 0x98 => (None, Data),
        b'.' => (None, Stop),
        b'R' | b'b' | b'o' | 0x81 | 0x92 => (None, Call),
        0x93 => (None, Fetch),
        b'K' | b'h' | b'q' | 0x80 => (Fixed(1), Data),
        b'M' => (Fixed(2), Data),
        b'J' | b'j' | b'r' => (Fixed(4), Data),
        b'G' | 0x95 => (Fixed(8), Data),
        0x82 => (Fixed(1), Fetch),
        0x83 => (Fixed(2), Fetch),
        0x84 => (Fixed(4), Fetch),
        b'U' | b'C' | 0x8a | 0x8c => (Counted(1), Data),
        b'T' | b'X' | b'B' | 0x8b => (Counted(4), Data),
        0x8d | 0x8e | 0x96 => (Counted(8), Data),
        b'I' | b'L' | b'p' | b'g' => (Line(self::Line::Int), Data),
        b'F' => (Line(self::Line::Float), Data),
        b'S' => (Line(self::Line::Quoted), Data),
        b'V' | b'P' => (Line(self::Line::Any), Data),
        b'c' => (Names, Fetch),
        b'i' => (Names, FetchCall),
        _ => return Option::None,
    })
}

/// Why the scan stopped.
enum End {
    /// The bytes stop being a well-formed stream (or end).
    Malformed,
    /// The stream is a pickle.
    Pickle,
}

struct Scanner<'a, S: Source + ?Sized> {
    src: &'a S,
    pos: u64,
    window: Vec<u8>,
    window_at: u64,
}

impl<'a, S: Source + ?Sized> Scanner<'a, S> {
    fn new(src: &'a S) -> Self {
        Scanner {
            src,
            pos: 0,
            window: Vec::new(),
            window_at: 0,
        }
    }

    fn is_pickle(&mut self) -> io::Result<bool> {
        let mut fetched = false;
        for count in 0..MAX_OPCODES {
            match self.step()? {
                Err(End::Malformed) => return Ok(false),
                Err(End::Pickle) => return Ok(true),
                // STOP on an empty stack is an error, and a text file may
                // well begin with `.` (reStructuredText does).
                Ok(Effect::Stop) if count == 0 => return Ok(false),
                Ok(Effect::Stop | Effect::FetchCall) => return Ok(true),
                Ok(Effect::Call) if fetched => return Ok(true),
                Ok(Effect::Fetch) => fetched = true,
                Ok(Effect::Data | Effect::Call) => {}
            }
        }
        // Still well-formed after this many opcodes: no text gets here.
        Ok(true)
    }

    /// One opcode and its argument.
    fn step(&mut self) -> io::Result<Result<Effect, End>> {
        let Some(op) = self.byte()? else {
            return Ok(Err(End::Malformed));
        };
        let Some((arg, effect)) = opcode(op) else {
            return Ok(Err(End::Malformed));
        };
        let well_formed = match arg {
            Arg::None => true,
            Arg::Fixed(n) => self.skip(u64::from(n)),
            Arg::Counted(n) => match self.le(n)? {
                Some(len) => self.skip(len),
                None => false,
            },
            Arg::Line(shape) => match self.line()? {
                Some(line) => line_fits(shape, &line),
                None => return Ok(Err(End::Pickle)),
            },
            Arg::Names => {
                let mut ok = true;
                for _ in 0..2 {
                    match self.line()? {
                        Some(line) => ok &= is_name(&line),
                        None => return Ok(Err(End::Pickle)),
                    }
                }
                ok
            }
        };
        Ok(if well_formed {
            Ok(effect)
        } else {
            Err(End::Malformed)
        })
    }

    /// The byte at the cursor, read through a 64 KiB window.
    fn byte(&mut self) -> io::Result<Option<u8>> {
        if self.pos >= self.src.size() {
            return Ok(None);
        }
        let in_window =
            self.pos >= self.window_at && self.pos - self.window_at < self.window.len() as u64;
        if !in_window {
            self.window.resize(64 << 10, 0);
            let n = self.src.read_at(&mut self.window, self.pos)?;
            self.window.truncate(n);
            self.window_at = self.pos;
            if n == 0 {
                return Ok(None);
            }
        }
        let b = self.window[(self.pos - self.window_at) as usize];
        self.pos += 1;
        Ok(Some(b))
    }

    /// Moves past `n` bytes; false when they run past the end.
    fn skip(&mut self, n: u64) -> bool {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.src.size() => {
                self.pos = end;
                true
            }
            _ => false,
        }
    }

    /// A little-endian unsigned length of `n` bytes.
    fn le(&mut self, n: u8) -> io::Result<Option<u64>> {
        let mut v = 0u64;
        for i in 0..n {
            match self.byte()? {
                Some(b) => v |= u64::from(b) << (8 * i),
                None => return Ok(None),
            }
        }
        // BINSTRING's length is signed: a negative one is malformed.
        if n == 4 && v >= 1 << 31 {
            return Ok(None);
        }
        Ok(Some(v))
    }

    /// A line without its newline; `None` when it runs past [`MAX_LINE`]
    /// (the unpickler would still read it). A line the file ends inside is
    /// returned as a line that fits no shape.
    fn line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        while line.len() < MAX_LINE {
            match self.byte()? {
                Some(b'\n') => return Ok(Some(line)),
                Some(b) => line.push(b),
                // A truncated line: the unpickler fails reading it.
                None => return Ok(Some(vec![b'\0'])),
            }
        }
        Ok(None)
    }
}

fn line_fits(shape: Line, line: &[u8]) -> bool {
    let trimmed = line.trim_ascii();
    match shape {
        Line::Any => !line.contains(&b'\0'),
        Line::Int => {
            let digits = trimmed.strip_suffix(b"L").unwrap_or(trimmed);
            let digits = digits
                .strip_prefix(b"-")
                .or_else(|| digits.strip_prefix(b"+"))
                .unwrap_or(digits);
            !digits.is_empty()
                && digits
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
                && digits[0].is_ascii_digit()
        }
        Line::Float => {
            !trimmed.is_empty()
                && trimmed
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_'))
        }
        Line::Quoted => {
            trimmed.len() >= 2
                && matches!(trimmed[0], b'\'' | b'"')
                && trimmed.last() == Some(&trimmed[0])
        }
    }
}

/// A module or attribute name as GLOBAL and INST carry them: no spaces or
/// control bytes (anything else may be a non-ASCII identifier).
fn is_name(line: &[u8]) -> bool {
    !line.is_empty() && line.iter().all(|b| *b > b' ' && *b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(bytes: &[u8]) -> Option<Refusal> {
        classify(bytes)
    }

    #[test]
    fn protocol_0_and_1_pickles_are_recognised() {
        // pickle.dumps(os.system) style payloads and plain data, protocol 0.
        assert_eq!(
            refused(b"cos\nsystem\n(S'id'\ntR."),
            Some(Refusal::PickleOpcodes)
        );
        // Cut off after the call: the unpickler has already run it.
        assert_eq!(
            refused(b"cposix\nsystem\n(S'id'\ntR"),
            Some(Refusal::PickleOpcodes)
        );
        assert_eq!(refused(b"(ibuiltins\nlist\n"), Some(Refusal::PickleOpcodes));
        // pickle.dumps({'a': [1, 2.5]}, protocol=0)
        assert_eq!(
            refused(b"(dp0\nVa\np1\n(lp2\nI1\naF2.5\nas."),
            Some(Refusal::PickleOpcodes)
        );
        // pickle.dumps({'a': [1, 2.5]}, protocol=1)
        assert_eq!(
            refused(b"}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00es."),
            Some(Refusal::PickleOpcodes)
        );
        // STACK_GLOBAL then REDUCE without a PROTO header.
        assert_eq!(
            refused(b"\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R"),
            Some(Refusal::PickleOpcodes)
        );
    }

    #[test]
    fn headers_and_containers_are_recognised() {
        assert_eq!(refused(&[0x80, 0x04, 0x95]), Some(Refusal::PickleHeader));
        for (bytes, kind) in [
            (&b"PK\x03\x04rest"[..], "zip"),
            (b"\x1f\x8b\x08\x00", "gzip"),
            (b"BZh91AY&SY", "bzip2"),
            (b"\xfd7zXZ\x00\x00", "xz"),
            (b"\x28\xb5\x2f\xfd\x00", "zstd"),
            (b"\x78\x9c\x03\x00", "zlib"),
            (b"\x78\xda\x03\x00", "zlib"),
        ] {
            match refused(bytes) {
                Some(Refusal::Container(k)) => assert!(k.starts_with(kind), "{k} for {kind}"),
                other => panic!("{kind}: {other:?}"),
            }
        }
        let mut tar = vec![0u8; 1024];
        tar[..9].copy_from_slice(b"data.pkl\0");
        tar[257..263].copy_from_slice(b"ustar\0");
        assert!(matches!(refused(&tar), Some(Refusal::Container(k)) if k.starts_with("tar")));
    }

    #[test]
    fn numpy_object_arrays_are_refused_and_numeric_ones_kept() {
        let npy = |header: &str| {
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            v.extend_from_slice(&(header.len() as u16).to_le_bytes());
            v.extend_from_slice(header.as_bytes());
            v.extend_from_slice(&[0; 16]);
            v
        };
        assert_eq!(
            refused(&npy(
                "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }\n"
            )),
            Some(Refusal::NumpyObject)
        );
        assert_eq!(
            refused(&npy(
                "{'descr': [('a', '<f4'), ('b', 'O')], 'fortran_order': False, 'shape': (2,), }\n"
            )),
            Some(Refusal::NumpyObject)
        );
        assert_eq!(
            refused(&npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }\n"
            )),
            None
        );
        // A header longer than the file: refused, not skipped.
        let mut short = npy("{'descr': '<f4'}");
        short.truncate(12);
        assert_eq!(refused(&short), Some(Refusal::NumpyObject));
    }

    #[test]
    fn text_json_and_tokenizer_files_are_not_pickles() {
        for text in [
            &b"{\"architectures\": [\"LlamaForCausalLM\"]}"[..],
            b"[PAD]\n[UNK]\n",
            b"#version: 0.2\nh e\n",
            b"MIT License\n\nCopyright (c) 2026 Example. All rights reserved.\n",
            b"Copyright (c) 2026 The Authors. Licensed under the Apache License.\n",
            b"Apache License\nVersion 2.0, January 2004\n",
            b"---\nlicense: apache-2.0\n---\n# Model card.\n",
            b"import torch\n",
            b".. rst title\n",
            b"80,90\n",
            b"\n",
            b"",
            // A sentencepiece model is a protobuf: field 1, length-delimited.
            b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00",
            // An npy of floats.
            b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}",
            // A pickle header from an unknown protocol is not one numpy or
            // Python writes; the opcode scan still sees PROTO, then stops.
            b"\x80\x09",
        ] {
            assert_eq!(refused(text), None, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn malformed_streams_stop_the_scan() {
        // A GLOBAL whose name has a space: the unpickler cannot find it.
        assert_eq!(refused(b"cos system\nx\nR."), None);
        // A length running past the end.
        assert_eq!(refused(b"X\xff\xff\x00\x00ab."), None);
        // A negative BINSTRING length.
        assert_eq!(refused(b"T\xff\xff\xff\xffR."), None);
        // INT with a non-number.
        assert_eq!(refused(b"Ihello\n."), None);
        // A truncated line.
        assert_eq!(refused(b"cos\nsys"), None);
    }

    #[test]
    fn long_well_formed_streams_fail_closed() {
        // Empty tuples forever: well-formed, never stops, never calls.
        assert_eq!(
            refused(&vec![b')'; MAX_OPCODES + 1]),
            Some(Refusal::PickleOpcodes)
        );
        assert_eq!(refused(&[b')'; 100]), None);
        // A line longer than the scan reads.
        let mut long = b"V".to_vec();
        long.resize(MAX_LINE + 2, b'a');
        assert_eq!(refused(&long), Some(Refusal::PickleOpcodes));
    }

    #[test]
    fn files_are_read_through_the_window() {
        // A protocol 0 pickle whose call comes after a 200 KiB string:
        // the scan reads past its first window.
        let mut bytes = b"cos\nsystem\n(X".to_vec();
        let len = 200u32 << 10;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.resize(bytes.len() + len as usize, b'a');
        bytes.extend_from_slice(b"tR.");
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        assert_eq!(
            classify_file(&f, bytes.len() as u64).unwrap(),
            Some(Refusal::PickleOpcodes)
        );
        // The same bytes with the call cut off before it and a size that
        // stops short: not a pickle that calls, not one that stops.
        let cut = bytes.len() as u64 - 3;
        assert_eq!(classify_file(&f, cut).unwrap(), None);
    }
}
