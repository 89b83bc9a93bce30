//! Recognising pickle-based files by their bytes, whatever they are named.
//!
//! File names with a pickle format's extension are refused before hashing
//! ([`super::safetensors::is_pickle_name`]). After hashing, every file that
//! is not `.safetensors` is classified here, on the verified bytes:
//!
//! - **pickle streams of any protocol.** Protocols 2 to 5 begin with PROTO
//!   (`0x80 n`). Protocols 0 and 1 have no header, so the bytes from offset
//!   0 are run through a model of CPython's unpickler (`_pickle.c`): each
//!   opcode's argument encoding, the object and mark stacks, the memo. The
//!   unpickler executes opcodes as it reads them, so what matters is not
//!   whether the stream is complete but whether its well-formed prefix can
//!   call something: an opcode that fetches a callable or object (GLOBAL,
//!   STACK_GLOBAL, EXT*, PERSID, BINPERSID) and then one that calls
//!   (REDUCE, BUILD, OBJ, NEWOBJ*), or INST, which does both. A prefix that
//!   reaches STOP is a pickle too, as is one still well-formed after
//!   [`MAX_OPCODES`] opcodes or inside a line of [`MAX_LINE`]. The scan
//!   stops where CPython stops (an argument it cannot read, an underflow, a
//!   missing mark or memo key), and where the model is unsure it is the
//!   laxer: it may call a stream a pickle that CPython rejects, never the
//!   other way round. Text stops within a few bytes: `{`, `[`, `#`, space
//!   and newline are not opcodes, and `1.0.0` or `airplane` underflow.
//! - **containers a pickle hides in**: zip (PyTorch's format, numpy's
//!   `.npz`; also by its end-of-directory record, as zip readers find it),
//!   tar (PyTorch's legacy format; v7 by its checksum), and gzip, zlib,
//!   `.lzma`, bzip2, xz, zstd, lz4 and 7z streams (joblib compresses its
//!   pickles). The worker can use none of them; a model ships safetensors
//!   and plain JSON or text.
//! - **numpy `.npy` arrays** whose dtype is not a plain type string: object
//!   arrays are stored pickled.
//!
//! A refusal is never a verdict on the file's safety beyond "not a format
//! the worker loads, and one that may run code when something else does".

use std::collections::HashSet;
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
    if zip_directory(src)? {
        return Ok(Some(Refusal::Container(
            "zip archive (its directory at the end; PyTorch's format holds a pickle)",
        )));
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
    // zlib (joblib's default compressor): deflate, a window of at most
    // 32 KiB, no preset dictionary, and the check that makes CMF·256+FLG
    // a multiple of 31: every header `zlib.decompress` takes without a
    // dictionary.
    if let [cmf, flg, ..] = *head {
        if cmf & 0x0f == 8
            && cmf >> 4 <= 7
            && flg & 0x20 == 0
            && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
        {
            return Some("zlib stream");
        }
    }
    // The .lzma ("alone") format joblib's lzma compressor writes: the
    // properties byte of the default lc=3 lp=0 pb=2, then a dictionary
    // size liblzma accepts (2^n or 2^n + 2^(n-1), or all ones).
    if let [0x5d, d0, d1, d2, d3, ..] = *head {
        let dict = u32::from_le_bytes([d0, d1, d2, d3]);
        let canonical = dict == u32::MAX || {
            let top = 31 - dict.max(1).leading_zeros();
            dict == 1 << top || (top > 0 && dict == (1 << top) | (1 << (top - 1)))
        };
        if canonical && dict >= 4096 {
            return Some("lzma stream");
        }
    }
    if is_tar_header(head) {
        return Some("tar archive (PyTorch's legacy format holds pickles)");
    }
    None
}

/// Whether `head` begins with a tar header: `ustar` magic, or (v7 tar,
/// which has none) a checksum field that matches the header's bytes, as
/// Python's `tarfile` checks it (unsigned or signed sum, the field itself
/// counted as spaces).
fn is_tar_header(head: &[u8]) -> bool {
    if head.get(257..262) == Some(b"ustar") {
        return true;
    }
    let Some(block) = head.get(..512) else {
        return false;
    };
    let field = &block[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    // The rest of the field is NUL or space padding.
    let rest = &field[field.iter().take_while(|b| **b == b' ').count() + digits.len()..];
    if digits.is_empty() || !rest.iter().all(|b| matches!(b, 0 | b' ')) {
        return false;
    }
    let Ok(stored) = u64::from_str_radix(std::str::from_utf8(&digits).unwrap_or("x"), 8) else {
        return false;
    };
    let spaces = 8 * u64::from(b' ');
    let unsigned: u64 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| u64::from(*b))
        .sum::<u64>()
        + spaces;
    let signed: i64 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| i64::from(*b as i8))
        .sum::<i64>()
        + spaces as i64;
    // An all-zero block sums to the spaces alone: not a header.
    unsigned != spaces && (stored == unsigned || i64::try_from(stored) == Ok(signed))
}

/// Whether the file ends in a zip end-of-central-directory record: zip
/// readers (Python's `zipfile`, PyTorch's) find an archive from its end,
/// whatever precedes it.
fn zip_directory(src: &(impl Source + ?Sized)) -> io::Result<bool> {
    // The record is 22 bytes and its comment at most 65535.
    const TAIL: u64 = 22 + 65535;
    let size = src.size();
    if size < 22 {
        return Ok(false);
    }
    let start = size.saturating_sub(TAIL);
    let mut tail = vec![0u8; (size - start) as usize];
    let n = src.read_at(&mut tail, start)?;
    tail.truncate(n);
    Ok(tail.windows(22).enumerate().any(|(at, w)| {
        // The comment length must reach exactly the end of the file.
        w.starts_with(b"PK\x05\x06")
            && at + 22 + usize::from(u16::from_le_bytes([w[20], w[21]])) == tail.len()
    }))
}

/// Whether an `.npy` file's dtype may hold objects. Fails closed: only a
/// plain type string (`'<f4'`, `'|b1'`, `'<M8[ns]'`, ...) is kept; an
/// object dtype, a record, anything spelled otherwise (`'object'`, an
/// escape) and a header that cannot be read count as object.
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
    Ok(!plain_descr(&header))
}

/// Whether a numpy header's `descr` is one quoted plain type string.
fn plain_descr(header: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(header) else {
        return false;
    };
    // Exactly one `descr` key, whatever else the dict holds.
    let keys: Vec<usize> = text
        .match_indices("'descr'")
        .chain(text.match_indices("\"descr\""))
        .map(|(at, _)| at)
        .collect();
    let [at] = keys[..] else {
        return false;
    };
    let value = text[at + 7..].trim_start();
    let Some(value) = value.strip_prefix(':') else {
        return false;
    };
    let value = value.trim_start();
    let Some(quote) = value.chars().next().filter(|c| matches!(c, '\'' | '"')) else {
        return false;
    };
    let Some(end) = value[1..].find(quote) else {
        return false;
    };
    let ty = &value[1..1 + end];
    let ty = ty.strip_prefix(['<', '>', '|', '=']).unwrap_or(ty);
    let mut chars = ty.chars();
    match chars.next() {
        // bool, (u)int, float, complex, bytes, str, void: a size or none.
        Some('?' | 'b' | 'B' | 'i' | 'u' | 'f' | 'c' | 'S' | 'U' | 'V' | 'e' | 'd' | 'g') => {
            chars.all(|c| c.is_ascii_digit())
        }
        // datetime and timedelta, with an optional unit.
        Some('M' | 'm') => {
            let rest: String = chars.collect();
            let unit = rest.strip_prefix('8').unwrap_or(&rest);
            unit.is_empty()
                || unit
                    .strip_prefix('[')
                    .and_then(|u| u.strip_suffix(']'))
                    .is_some_and(|u| !u.is_empty() && u.chars().all(|c| c.is_ascii_alphanumeric()))
        }
        _ => false,
    }
}

/// How an opcode's argument is encoded.
#[derive(Clone, Copy)]
enum Arg {
    None,
    /// Fixed number of bytes, little-endian.
    Fixed(u8),
    /// A little-endian unsigned length of this many bytes, then that many
    /// bytes.
    Counted(u8),
    /// LONG4: a signed 4-byte length (negative is an error), then bytes.
    SignedCounted,
    /// One newline-terminated line of this shape.
    Line(Line),
    /// Two lines of module and name (GLOBAL, INST).
    Names,
}

#[derive(Clone, Copy, PartialEq)]
enum Line {
    /// An integer as CPython reads it (`strtol`, `PyLong_FromString`):
    /// INT, LONG.
    Int,
    /// A memo key (PUT, GET): a non-negative decimal.
    Key,
    Float,
    /// A quoted string literal (STRING).
    Quoted,
    /// Anything (UNICODE, PERSID).
    Any,
}

/// What an opcode does to the unpickler's stack, modelled on CPython's
/// `_pickle.c`: an object stack and a stack of marks (positions in it).
/// Where CPython is stricter than the model (a pop below the latest mark
/// is an underflow there), the model is the laxer: it may call a stream
/// a pickle that CPython rejects, never the other way round.
#[derive(Clone, Copy)]
enum Stack {
    /// Needs `pop` objects; pops them and pushes `push`.
    Pops {
        pop: u8,
        push: u8,
    },
    /// Pops to the latest mark (an error without one), needing `inside`
    /// objects above it and `below` under it; pushes `push`.
    ToMark {
        inside: u8,
        below: u8,
        push: u8,
    },
    Mark,
    /// POP: the latest mark, if nothing is above it; else one object.
    Pop,
}

/// What an opcode does, as far as calling code goes.
#[derive(Clone, Copy, PartialEq)]
enum Effect {
    Data,
    /// Pushes a callable or object found by name or id (GLOBAL,
    /// STACK_GLOBAL, EXT*, PERSID, BINPERSID).
    Fetch,
    /// Calls something on the stack (REDUCE, BUILD, OBJ, NEWOBJ, NEWOBJ_EX).
    Call,
    /// INST: fetches and calls.
    FetchCall,
    Stop,
}

/// What a memo opcode does.
#[derive(Clone, Copy, PartialEq)]
enum Memo {
    None,
    /// PUT, BINPUT, LONG_BINPUT: the argument is the key.
    Put,
    /// GET, BINGET, LONG_BINGET: the key must be there.
    Get,
    /// MEMOIZE: the key is the memo's size.
    Memoize,
}

struct Op {
    arg: Arg,
    stack: Stack,
    effect: Effect,
    memo: Memo,
}

/// Every opcode of pickle protocols 0 to 5 (CPython's `pickletools` and
/// `_pickle.c`).
fn opcode(op: u8) -> Option<Op> {
    use Arg::*;
    use Effect::*;
    let push = Stack::Pops { pop: 0, push: 1 };
    let none = Stack::Pops { pop: 0, push: 0 };
    let to_mark = |inside, below, push| Stack::ToMark {
        inside,
        below,
        push,
    };
    let pops = |pop, push| Stack::Pops { pop, push };
    let (arg, stack, effect, memo) = match op {
        b'(' => (None, Stack::Mark, Data, Memo::None),
        b'.' => (None, pops(1, 0), Stop, Memo::None),
        b'0' => (None, Stack::Pop, Data, Memo::None),
        b'1' => (None, to_mark(0, 0, 0), Data, Memo::None),
        b'2' => (None, pops(1, 2), Data, Memo::None),
        // NONE, NEWTRUE, NEWFALSE, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE,
        // EMPTY_SET, NEXT_BUFFER.
        b'N' | 0x88 | 0x89 | b'}' | b']' | b')' | 0x8f | 0x97 => (None, push, Data, Memo::None),
        b'F' => (Line(self::Line::Float), push, Data, Memo::None),
        b'I' | b'L' => (Line(self::Line::Int), push, Data, Memo::None),
        b'S' => (Line(self::Line::Quoted), push, Data, Memo::None),
        b'V' => (Line(self::Line::Any), push, Data, Memo::None),
        b'P' => (Line(self::Line::Any), push, Fetch, Memo::None),
        b'Q' => (None, pops(1, 1), Fetch, Memo::None),
        b'J' => (Fixed(4), push, Data, Memo::None),
        b'K' => (Fixed(1), push, Data, Memo::None),
        b'M' => (Fixed(2), push, Data, Memo::None),
        b'G' => (Fixed(8), push, Data, Memo::None),
        b'U' | b'C' | 0x8a | 0x8c => (Counted(1), push, Data, Memo::None),
        b'T' | b'X' | b'B' => (Counted(4), push, Data, Memo::None),
        0x8b => (SignedCounted, push, Data, Memo::None),
        0x8d | 0x8e | 0x96 => (Counted(8), push, Data, Memo::None),
        b'a' => (None, pops(2, 1), Data, Memo::None),
        b'e' | b'u' | 0x90 => (None, to_mark(0, 1, 0), Data, Memo::None),
        b's' => (None, pops(3, 1), Data, Memo::None),
        b'd' | b'l' | b't' | 0x91 => (None, to_mark(0, 0, 1), Data, Memo::None),
        0x85 => (None, pops(1, 1), Data, Memo::None),
        0x86 => (None, pops(2, 1), Data, Memo::None),
        0x87 => (None, pops(3, 1), Data, Memo::None),
        b'R' | 0x81 | b'b' => (None, pops(2, 1), Call, Memo::None),
        0x92 => (None, pops(3, 1), Call, Memo::None),
        b'o' => (None, to_mark(1, 0, 1), Call, Memo::None),
        b'c' => (Names, push, Fetch, Memo::None),
        b'i' => (Names, to_mark(0, 0, 1), FetchCall, Memo::None),
        0x93 => (None, pops(2, 1), Fetch, Memo::None),
        0x82 => (Fixed(1), push, Fetch, Memo::None),
        0x83 => (Fixed(2), push, Fetch, Memo::None),
        0x84 => (Fixed(4), push, Fetch, Memo::None),
        b'p' => (Line(self::Line::Key), pops(1, 1), Data, Memo::Put),
        b'q' => (Fixed(1), pops(1, 1), Data, Memo::Put),
        b'r' => (Fixed(4), pops(1, 1), Data, Memo::Put),
        0x94 => (None, pops(1, 1), Data, Memo::Memoize),
        b'g' => (Line(self::Line::Key), push, Data, Memo::Get),
        b'h' => (Fixed(1), push, Data, Memo::Get),
        b'j' => (Fixed(4), push, Data, Memo::Get),
        // READONLY_BUFFER: the object on top, made read-only.
        0x98 => (None, pops(1, 1), Data, Memo::None),
        // PROTO and FRAME: checked in the scan.
        0x80 => (Fixed(1), none, Data, Memo::None),
        0x95 => (Fixed(8), none, Data, Memo::None),
        _ => return Option::None,
    };
    Some(Op {
        arg,
        stack,
        effect,
        memo,
    })
}

/// Why the scan stopped.
enum End {
    /// The bytes stop being a stream the unpickler reads on (or end).
    Malformed,
    /// The stream is a pickle.
    Pickle,
}

/// A line as read: its bytes, the end of the file before a newline (the
/// unpickler fails there), or longer than [`MAX_LINE`].
enum ReadLine {
    Line(Vec<u8>),
    Eof,
    TooLong,
}

struct Scanner<'a, S: Source + ?Sized> {
    src: &'a S,
    pos: u64,
    window: Vec<u8>,
    window_at: u64,
    /// Objects on the stack.
    depth: u64,
    /// The stack depth at each mark.
    marks: Vec<u64>,
    memo: HashSet<u64>,
    fetched: bool,
}

impl<'a, S: Source + ?Sized> Scanner<'a, S> {
    fn new(src: &'a S) -> Self {
        Scanner {
            src,
            pos: 0,
            window: Vec::new(),
            window_at: 0,
            depth: 0,
            marks: Vec::new(),
            memo: HashSet::new(),
            fetched: false,
        }
    }

    fn is_pickle(&mut self) -> io::Result<bool> {
        for _ in 0..MAX_OPCODES {
            match self.step()? {
                Ok(()) => {}
                Err(End::Malformed) => return Ok(false),
                Err(End::Pickle) => return Ok(true),
            }
        }
        // Still well-formed after this many opcodes: no text gets here.
        Ok(true)
    }

    /// One opcode: its argument, its effect on the stack and the memo.
    fn step(&mut self) -> io::Result<Result<(), End>> {
        let Some(code) = self.byte()? else {
            return Ok(Err(End::Malformed));
        };
        let Some(op) = opcode(code) else {
            return Ok(Err(End::Malformed));
        };
        // The argument: its value where one matters (memo keys, PROTO,
        // FRAME), else only whether it is there and well-formed.
        let mut value = None;
        let well_formed = match op.arg {
            Arg::None => true,
            Arg::Fixed(n) => match self.le(n)? {
                Some(v) => {
                    value = Some(v);
                    match code {
                        // PROTO: a protocol CPython knows.
                        0x80 => v <= 5,
                        // FRAME: the frame must be there to be read.
                        0x95 => self.fits(v),
                        _ => true,
                    }
                }
                None => false,
            },
            Arg::Counted(n) => match self.le(n)? {
                // Beyond isize::MAX is an error to CPython.
                Some(len) => len <= i64::MAX as u64 && self.skip(len),
                None => false,
            },
            Arg::SignedCounted => match self.le(4)? {
                Some(len) => len < 1 << 31 && self.skip(len),
                None => false,
            },
            Arg::Line(shape) => match self.line()? {
                ReadLine::Line(line) => match shape {
                    Line::Key => match key(&line) {
                        Some(k) => {
                            value = Some(k);
                            true
                        }
                        None => false,
                    },
                    _ => line_fits(shape, &line),
                },
                ReadLine::Eof => false,
                ReadLine::TooLong => return Ok(Err(End::Pickle)),
            },
            Arg::Names => {
                // INST looks for its mark before it reads a name.
                if code == b'i' && self.marks.is_empty() {
                    return Ok(Err(End::Malformed));
                }
                let mut ok = true;
                for _ in 0..2 {
                    match self.line()? {
                        ReadLine::Line(line) => ok &= is_name(&line),
                        ReadLine::Eof => ok = false,
                        ReadLine::TooLong => return Ok(Err(End::Pickle)),
                    }
                }
                ok
            }
        };
        if !well_formed || !self.apply(op.stack) {
            return Ok(Err(End::Malformed));
        }
        match op.memo {
            Memo::None => {}
            Memo::Put => {
                self.memo.insert(value.unwrap_or(0));
            }
            Memo::Memoize => {
                let k = self.memo.len() as u64;
                self.memo.insert(k);
            }
            Memo::Get => {
                if !self.memo.contains(&value.unwrap_or(u64::MAX)) {
                    return Ok(Err(End::Malformed));
                }
            }
        }
        Ok(match op.effect {
            Effect::Data => Ok(()),
            Effect::Fetch => {
                self.fetched = true;
                Ok(())
            }
            Effect::Call if self.fetched => Err(End::Pickle),
            Effect::Call => Ok(()),
            Effect::FetchCall | Effect::Stop => Err(End::Pickle),
        })
    }

    /// Applies a stack effect; false on an underflow or a missing mark.
    fn apply(&mut self, stack: Stack) -> bool {
        match stack {
            Stack::Mark => {
                self.marks.push(self.depth);
                true
            }
            Stack::Pop => {
                if self.marks.last() == Some(&self.depth) {
                    self.marks.pop();
                    true
                } else if self.depth > 0 {
                    self.depth -= 1;
                    true
                } else {
                    false
                }
            }
            Stack::Pops { pop, push } => {
                if self.depth < u64::from(pop) {
                    return false;
                }
                self.depth = self.depth - u64::from(pop) + u64::from(push);
                true
            }
            Stack::ToMark {
                inside,
                below,
                push,
            } => {
                let Some(mark) = self.marks.pop() else {
                    return false;
                };
                // (A depth below the mark is a state CPython never reaches,
                // its pops stop at the mark; the laxer model can.)
                if self.depth.saturating_sub(mark) < u64::from(inside) || mark < u64::from(below) {
                    return false;
                }
                self.depth = mark.min(self.depth) + u64::from(push);
                true
            }
        }
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

    /// Whether `n` more bytes are there.
    fn fits(&self, n: u64) -> bool {
        self.pos
            .checked_add(n)
            .is_some_and(|end| end <= self.src.size())
    }

    /// Moves past `n` bytes; false when they run past the end.
    fn skip(&mut self, n: u64) -> bool {
        if !self.fits(n) {
            return false;
        }
        self.pos += n;
        true
    }

    /// A little-endian unsigned value of `n` bytes.
    fn le(&mut self, n: u8) -> io::Result<Option<u64>> {
        let mut v = 0u64;
        for i in 0..n {
            match self.byte()? {
                Some(b) => v |= u64::from(b) << (8 * i),
                None => return Ok(None),
            }
        }
        Ok(Some(v))
    }

    /// A line without its newline.
    fn line(&mut self) -> io::Result<ReadLine> {
        let mut line = Vec::new();
        while line.len() < MAX_LINE {
            match self.byte()? {
                Some(b'\n') => return Ok(ReadLine::Line(line)),
                Some(b) => line.push(b),
                None => return Ok(ReadLine::Eof),
            }
        }
        Ok(ReadLine::TooLong)
    }
}

/// `line` up to its first NUL (C reads it as a string), without the
/// whitespace C's `isspace` skips.
fn c_number(line: &[u8]) -> &[u8] {
    let cut = line
        .iter()
        .position(|b| *b == 0)
        .map_or(line, |at| &line[..at]);
    let space = |b: &u8| matches!(b, b' ' | b'\t'..=b'\r');
    let start = cut.iter().position(|b| !space(b)).unwrap_or(cut.len());
    let end = cut
        .iter()
        .rposition(|b| !space(b))
        .map_or(start, |at| at + 1);
    &cut[start..end]
}

/// A memo key: a decimal that is not negative (`-0` is zero), with the
/// underscores and whitespace `PyLong_FromString` allows.
fn key(line: &[u8]) -> Option<u64> {
    let n = c_number(line);
    let (negative, n) = match n {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, n),
    };
    if n.first().is_none_or(|b| !b.is_ascii_digit()) {
        return None;
    }
    let digits: String = n
        .iter()
        .filter(|b| **b != b'_')
        .map(|b| *b as char)
        .collect();
    digits.parse().ok().filter(|k| !negative || *k == 0)
}

fn line_fits(shape: Line, line: &[u8]) -> bool {
    match shape {
        Line::Any | Line::Key => true,
        // `strtol` converting nothing, stopped at a NUL, reads as 0.
        Line::Int if line.first() == Some(&0) => true,
        Line::Int => {
            let n = c_number(line);
            let n = n.strip_suffix(b"L").unwrap_or(n);
            let n = n
                .strip_prefix(b"-")
                .or_else(|| n.strip_prefix(b"+"))
                .unwrap_or(n);
            n.first().is_some_and(u8::is_ascii_digit)
                && n.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
        }
        Line::Float => {
            let n = c_number(line);
            !n.is_empty()
                && n.iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_'))
        }
        // CPython takes the line as it is; the trimmed line too is laxer.
        Line::Quoted => {
            let quoted =
                |t: &[u8]| t.len() >= 2 && matches!(t[0], b'\'' | b'"') && t.last() == Some(&t[0]);
            quoted(line) || quoted(line.trim_ascii())
        }
    }
}

/// A module or attribute name as GLOBAL and INST carry them: none that
/// Python can import or look up holds a space or a control byte.
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
        for (bytes, why) in [
            (
                &b"cos system\nx\nR."[..],
                "a GLOBAL name with a space: not found",
            ),
            (b"X\xff\xff\x00\x00ab.", "a length running past the end"),
            (
                b"T\xff\xff\xff\xffR.",
                "BINSTRING past the end (CPython reads it unsigned)",
            ),
            (
                b"\x8b\xff\xff\xff\xffcos\nsystem\n)R.",
                "a negative LONG4 length",
            ),
            (b"\x80\x06cos\nsystem\n)R.", "an unknown protocol"),
            (b"R.", "a stack underflow"),
            (b"tcos\nsystem\n)R.", "a missing mark"),
            (b"ios\nsystem\n.", "INST without a mark"),
            (b"g0\n.", "a memo key never put"),
            (b"Np-1\n.", "a negative memo key"),
            (b"Ihello\n.", "INT with a non-number"),
            (b"cos\nsys", "a truncated line"),
        ] {
            assert_eq!(refused(bytes), None, "{why}");
        }
    }

    /// Bytes of `size`, zero except for `parts` at their offsets: files of
    /// gigabytes without the memory.
    struct Sparse {
        size: u64,
        parts: Vec<(u64, Vec<u8>)>,
    }

    impl Source for Sparse {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let n = buf.len().min(self.size.saturating_sub(offset) as usize);
            buf[..n].fill(0);
            for (at, bytes) in &self.parts {
                for (i, b) in bytes.iter().enumerate() {
                    let pos = at + i as u64;
                    if pos >= offset && pos < offset + n as u64 {
                        buf[(pos - offset) as usize] = *b;
                    }
                }
            }
            Ok(n)
        }
    }

    const PAYLOAD: &[u8] = b"cos\nsystem\n(S'id'\ntR.";

    #[test]
    fn prefixes_cpython_reads_on_from_do_not_hide_a_call() {
        // Each prefix is one CPython's C unpickler accepts, so the payload
        // after it runs.
        for prefix in [
            &b"V\x00\n0"[..],
            b"I1\x00x\n0",
            b"I\x00\n0",
            b"L1\x00\n0",
            b"F1.0\x00\n0",
            b"I\x0b1\n0",
            b"S'a\x00b'\n0",
            b"Np-0\ng0\n00",
            b"Np 7 \n0g7\n0",
            b"N0\x95\x04\x00\x00\x00\x00\x00\x00\x00N0N0",
            b"\x80\x01N0",
        ] {
            let bytes = [prefix, PAYLOAD].concat();
            assert_eq!(
                refused(&bytes),
                Some(Refusal::PickleOpcodes),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // A 4-byte length with its top bit set is a length, not an error:
        // 2 GiB of string, then the payload.
        for code in [b'X', b'T', b'B'] {
            let len = 0x8000_0000u32;
            let mut head = vec![code];
            head.extend_from_slice(&len.to_le_bytes());
            head.push(b'0');
            let head_len = head.len() as u64 - 1;
            let sparse = Sparse {
                size: head_len + u64::from(len) + 1 + PAYLOAD.len() as u64,
                parts: vec![
                    (0, head[..5].to_vec()),
                    (head_len + u64::from(len), b"0".to_vec()),
                    (head_len + u64::from(len) + 1, PAYLOAD.to_vec()),
                ],
            };
            assert_eq!(
                classify_source(&sparse).unwrap(),
                Some(Refusal::PickleOpcodes),
                "opcode {}",
                code as char
            );
        }
    }

    #[test]
    fn text_that_underflows_the_stack_is_not_a_pickle() {
        for text in [
            &b"1.0.0\n"[..],
            b"0.5\n",
            b"e.g. this\n",
            b"airplane\nautomobile\nbird\n",
            b"accelerate\ntorch\ntransformers\n",
            b"id,label\n0,cat\n",
            b"labels\n",
            b"dog.\n",
        ] {
            assert_eq!(refused(text), None, "{}", String::from_utf8_lossy(text));
        }
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
