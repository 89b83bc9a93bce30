//! The admin protocol, version 1: one JSON request per line, one JSON
//! response per line. docs/admin-protocol.md is the reference.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// Largest `limit` of an `audit` request.
pub const MAX_AUDIT_LIMIT: usize = 1000;

/// Stable error codes. Scripts match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON, or not a JSON object.
    InvalidJson,
    /// A field has the wrong type or value, or is not known.
    InvalidRequest,
    /// A required field is missing (`v`, `cmd`, `reason`).
    MissingField,
    /// `v` is not a version this daemon speaks.
    UnsupportedVersion,
    /// `cmd` names no command.
    UnknownCommand,
    /// The request line is longer than 64 KiB.
    RequestTooLarge,
    /// The client did not send a whole request in time.
    Timeout,
    /// The peer may not run this command.
    PermissionDenied,
    /// The daemon is serving as many connections as it allows.
    TooManyConnections,
    /// The node's state does not allow this command now.
    InvalidTransition,
    /// The new state could not be saved.
    PersistFailed,
    /// The daemon is shutting down.
    ShuttingDown,
    /// `model_load` was refused; `detail` names why (`signature_invalid`,
    /// `device_taken`, ...).
    ModelLoadFailed,
    /// `model_unload` of a model that is not loaded.
    ModelNotLoaded,
    /// This daemon serves no models (no inference manager).
    InferenceUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::Timeout => "timeout",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::InvalidTransition => "invalid_transition",
            ErrorCode::PersistFailed => "persist_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ModelLoadFailed => "model_load_failed",
            ErrorCode::ModelNotLoaded => "model_not_loaded",
            ErrorCode::InferenceUnavailable => "inference_unavailable",
        }
    }
}

/// An error as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// A finer stable code, for errors that have one (`model_load_failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl Response {
    pub fn ok(id: Option<Value>, result: Value) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: Option<Value>, code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(WireError {
                code,
                message: message.into(),
                detail: None,
            }),
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("responses always serialise");
        line.push(b'\n');
        line
    }
}

/// The commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Status,
    Drain,
    Undrain,
    Quarantine,
    Release,
    Audit,
    Gpus,
    Drift,
    Models,
    ModelLoad,
    ModelUnload,
}

impl Command {
    pub const ALL: [Command; 11] = [
        Command::Status,
        Command::Drain,
        Command::Undrain,
        Command::Quarantine,
        Command::Release,
        Command::Audit,
        Command::Gpus,
        Command::Drift,
        Command::Models,
        Command::ModelLoad,
        Command::ModelUnload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Drain => "drain",
            Command::Undrain => "undrain",
            Command::Quarantine => "quarantine",
            Command::Release => "release",
            Command::Audit => "audit",
            Command::Gpus => "gpus",
            Command::Drift => "drift",
            Command::Models => "models",
            Command::ModelLoad => "model_load",
            Command::ModelUnload => "model_unload",
        }
    }

    pub fn from_name(name: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether a member of the read-only group may run it.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            Command::Status | Command::Gpus | Command::Drift | Command::Models
        )
    }

    /// Whether it needs a `reason`.
    pub fn needs_reason(self) -> bool {
        matches!(
            self,
            Command::Drain | Command::Undrain | Command::Quarantine | Command::Release
        )
    }
}

/// A parsed, well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub command: Command,
    /// Present (but not yet checked) for commands that take one.
    pub reason: Option<String>,
    /// For `audit`.
    pub limit: usize,
    /// For `model_load`: the model, as a `[[inference.models]]` entry.
    pub model: Option<Value>,
    /// For `model_unload`: the model's name.
    pub name: Option<String>,
}

impl Request {
    /// Builds the wire form of a request (used by clients).
    pub fn to_line(command: Command, reason: Option<&str>, limit: Option<usize>) -> Vec<u8> {
        let mut obj = Map::new();
        obj.insert("v".into(), PROTOCOL_VERSION.into());
        obj.insert("cmd".into(), command.as_str().into());
        if let Some(r) = reason {
            obj.insert("reason".into(), r.into());
        }
        if let Some(l) = limit {
            obj.insert("limit".into(), l.into());
        }
        let mut line = serde_json::to_vec(&Value::Object(obj)).expect("serialises");
        line.push(b'\n');
        line
    }

    /// The wire form of a request with fields beyond `reason` and `limit`
    /// (`model`, `name`).
    pub fn to_line_with(command: Command, fields: Map<String, Value>) -> Vec<u8> {
        let mut obj = fields;
        obj.insert("v".into(), PROTOCOL_VERSION.into());
        obj.insert("cmd".into(), command.as_str().into());
        let mut line = serde_json::to_vec(&Value::Object(obj)).expect("serialises");
        line.push(b'\n');
        line
    }
}

/// A request that could not be parsed: the code, the message, and the
/// request id if one could be read (so the client can match the error).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub id: Option<Value>,
    pub code: ErrorCode,
    pub message: String,
    /// The command, when it was recognised (for metrics).
    pub command: Option<Command>,
}

/// Longest request id echoed back, in bytes of JSON.
const MAX_ID_BYTES: usize = 128;

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, ParseError> {
    let fail = |id: Option<Value>, command, code, message: String| ParseError {
        id,
        code,
        message,
        command,
    };
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        fail(
            None,
            None,
            ErrorCode::InvalidJson,
            format!("request is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(fail(
            None,
            None,
            ErrorCode::InvalidJson,
            "request must be a JSON object".into(),
        ));
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        // Integers only among numbers: a float id may not read back as
        // sent (found by fuzzing), and clients match responses by id.
        Some(id @ Value::Number(_)) if !(id.is_i64() || id.is_u64()) => {
            return Err(fail(
                None,
                None,
                ErrorCode::InvalidRequest,
                "id must be a string or an integer".into(),
            ))
        }
        Some(id @ (Value::String(_) | Value::Number(_))) => {
            if id.to_string().len() > MAX_ID_BYTES {
                return Err(fail(
                    None,
                    None,
                    ErrorCode::InvalidRequest,
                    format!("id is longer than {MAX_ID_BYTES} bytes"),
                ));
            }
            Some(id)
        }
        Some(_) => {
            return Err(fail(
                None,
                None,
                ErrorCode::InvalidRequest,
                "id must be a string or an integer".into(),
            ))
        }
    };
    match obj.remove("v") {
        None => {
            return Err(fail(
                id,
                None,
                ErrorCode::MissingField,
                "missing field `v` (protocol version)".into(),
            ))
        }
        Some(Value::Number(n)) if n.as_u64() == Some(PROTOCOL_VERSION) => {}
        Some(other) => {
            return Err(fail(
                id,
                None,
                ErrorCode::UnsupportedVersion,
                format!(
                "protocol version {other} is not supported; this daemon speaks {PROTOCOL_VERSION}"
            ),
            ))
        }
    }
    let command = match obj.remove("cmd") {
        None => {
            return Err(fail(
                id,
                None,
                ErrorCode::MissingField,
                "missing field `cmd`".into(),
            ))
        }
        Some(Value::String(name)) => match Command::from_name(&name) {
            Some(c) => c,
            None => {
                let shown: String = name.chars().take(64).collect();
                return Err(fail(
                    id,
                    None,
                    ErrorCode::UnknownCommand,
                    format!("unknown command {shown:?}"),
                ));
            }
        },
        Some(_) => {
            return Err(fail(
                id,
                None,
                ErrorCode::InvalidRequest,
                "`cmd` must be a string".into(),
            ))
        }
    };
    let reason = match obj.remove("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if command.needs_reason() => Some(r),
        Some(Value::String(_)) => {
            return Err(fail(
                id,
                Some(command),
                ErrorCode::InvalidRequest,
                format!("`{}` takes no reason", command.as_str()),
            ))
        }
        Some(_) => {
            return Err(fail(
                id,
                Some(command),
                ErrorCode::InvalidRequest,
                "`reason` must be a string".into(),
            ))
        }
    };
    if command.needs_reason() && reason.is_none() {
        return Err(fail(
            id,
            Some(command),
            ErrorCode::MissingField,
            format!("`{}` requires a `reason`", command.as_str()),
        ));
    }
    let limit = match obj.remove("limit") {
        None | Some(Value::Null) => 50,
        Some(Value::Number(n)) if command == Command::Audit => match n.as_u64() {
            Some(l @ 1..) if l as usize <= MAX_AUDIT_LIMIT => l as usize,
            _ => {
                return Err(fail(
                    id,
                    Some(command),
                    ErrorCode::InvalidRequest,
                    format!("`limit` must be between 1 and {MAX_AUDIT_LIMIT}"),
                ))
            }
        },
        Some(_) => {
            return Err(fail(
                id,
                Some(command),
                ErrorCode::InvalidRequest,
                "`limit` must be a number and is taken only by `audit`".into(),
            ))
        }
    };
    let model = match obj.remove("model") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) if command == Command::ModelLoad => Some(m),
        Some(_) => {
            return Err(fail(
                id,
                Some(command),
                ErrorCode::InvalidRequest,
                "`model` must be an object and is taken only by `model_load`".into(),
            ))
        }
    };
    if command == Command::ModelLoad && model.is_none() {
        return Err(fail(
            id,
            Some(command),
            ErrorCode::MissingField,
            "`model_load` requires a `model`".into(),
        ));
    }
    let name = match obj.remove("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) if command == Command::ModelUnload => Some(n),
        Some(_) => {
            return Err(fail(
                id,
                Some(command),
                ErrorCode::InvalidRequest,
                "`name` must be a string and is taken only by `model_unload`".into(),
            ))
        }
    };
    if command == Command::ModelUnload && name.is_none() {
        return Err(fail(
            id,
            Some(command),
            ErrorCode::MissingField,
            "`model_unload` requires a `name`".into(),
        ));
    }
    if let Some(key) = obj.keys().next() {
        let shown: String = key.chars().take(64).collect();
        return Err(fail(
            id,
            Some(command),
            ErrorCode::InvalidRequest,
            format!("unknown field {shown:?}"),
        ));
    }
    Ok(Request {
        id,
        command,
        reason,
        limit,
        model,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> ErrorCode {
        parse_request(line.as_bytes()).unwrap_err().code
    }

    #[test]
    fn parses_well_formed_requests() {
        let r = parse_request(br#"{"v":1,"cmd":"drain","reason":"fan","id":"a1"}"#).unwrap();
        assert_eq!(r.command, Command::Drain);
        assert_eq!(r.reason.as_deref(), Some("fan"));
        assert_eq!(r.id, Some(Value::from("a1")));
        let r = parse_request(br#"{"v":1,"cmd":"audit","limit":5}"#).unwrap();
        assert_eq!((r.command, r.limit), (Command::Audit, 5));
        let r = parse_request(br#"{"v":1,"cmd":"status"}"#).unwrap();
        assert_eq!(r.command, Command::Status);
    }

    #[test]
    fn client_lines_parse_back() {
        for c in Command::ALL {
            let reason = c.needs_reason().then_some("because");
            let limit = (c == Command::Audit).then_some(3);
            let line = match c {
                Command::ModelLoad => {
                    let mut f = Map::new();
                    f.insert("model".into(), serde_json::json!({"name": "m"}));
                    Request::to_line_with(c, f)
                }
                Command::ModelUnload => {
                    let mut f = Map::new();
                    f.insert("name".into(), "m".into());
                    Request::to_line_with(c, f)
                }
                _ => Request::to_line(c, reason, limit),
            };
            let r = parse_request(&line[..line.len() - 1]).unwrap();
            assert_eq!(r.command, c);
        }
    }

    #[test]
    fn model_commands_take_their_fields_only() {
        let load = br#"{"v":1,"cmd":"model_load","model":{"name":"m"}}"#;
        let r = parse_request(load).unwrap();
        assert_eq!(r.model.unwrap()["name"], "m");
        assert_eq!(
            code(r#"{"v":1,"cmd":"model_load"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"model_load","model":"m"}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"status","model":{"name":"m"}}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"model_unload"}"#),
            ErrorCode::MissingField
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"model_unload","name":3}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"models","name":"m"}"#),
            ErrorCode::InvalidRequest
        );
        assert!(Command::Models.is_read_only());
        assert!(!Command::ModelLoad.is_read_only() && !Command::ModelUnload.is_read_only());
    }

    #[test]
    fn every_malformed_request_has_its_code() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code("\"status\""), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"cmd":"status"}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"v":2,"cmd":"status"}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(r#"{"v":"1","cmd":"status"}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(code(r#"{"v":1}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"v":1,"cmd":7}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"v":1,"cmd":"reboot"}"#), ErrorCode::UnknownCommand);
        assert_eq!(code(r#"{"v":1,"cmd":"drain"}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"v":1,"cmd":"quarantine","reason":5}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"status","reason":"x"}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"audit","limit":0}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"audit","limit":100000}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"status","limit":3}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"status","extra":true}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"status","id":[1]}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"v":1,"cmd":"status","id":0.5e83}"#),
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn errors_keep_the_request_id() {
        let e = parse_request(br#"{"v":1,"cmd":"nope","id":42}"#).unwrap_err();
        assert_eq!(e.id, Some(Value::from(42)));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 256) as u8
                })
                .collect();
            let _ = parse_request(&bytes);
        }
    }
}
