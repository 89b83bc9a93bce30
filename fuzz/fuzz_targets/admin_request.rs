//! Admin socket request lines: peer-controlled bytes, parsed by
//! `ccnode_agent::admin::protocol::parse_request`.
//!
//! Beyond "no panic", checks what the server relies on:
//! - a parsed request keeps the parser's promises (a reason exactly when the
//!   command needs one, `limit` in range, a short string-or-number id);
//! - re-encoded with `Request::to_line` (the client's encoder) it is one
//!   line that parses back to the same command, reason and limit;
//! - the response the server would send (ok or error, echoing the id and
//!   the error message) is one line that decodes back to itself.
#![no_main]

use ccnode_agent::admin::protocol::{
    parse_request, Command, Request, Response, MAX_AUDIT_LIMIT, PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// protocol.rs's MAX_ID_BYTES (private there): longest id echoed back.
const MAX_ID_BYTES: usize = 128;

fn check_id(id: &Option<Value>) {
    if let Some(id) = id {
        assert!(id.is_string() || id.is_number(), "id {id} echoed back");
        assert!(
            id.to_string().len() <= MAX_ID_BYTES,
            "long id {id} echoed back"
        );
    }
}

/// A wire line: exactly one newline, at the end (JSON escapes the others).
fn one_line(line: &[u8]) -> &[u8] {
    let (last, body) = line.split_last().expect("a line is never empty");
    assert_eq!(*last, b'\n');
    assert!(!body.contains(&b'\n'), "line holds a raw newline: {line:?}");
    body
}

fn check_response(response: Response) {
    let line = response.to_line();
    let back: Response = serde_json::from_slice(one_line(&line)).expect("a response decodes");
    // Clients match responses to requests by the echoed id, so it must read
    // back exactly as the server holds it.
    assert_eq!(back, response, "the response does not read back as sent");
}

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            assert_eq!(req.reason.is_some(), req.command.needs_reason());
            assert!((1..=MAX_AUDIT_LIMIT).contains(&req.limit));
            check_id(&req.id);

            let limit = (req.command == Command::Audit).then_some(req.limit);
            let mut fields = serde_json::Map::new();
            if let Some(m) = &req.model {
                assert!(m.is_object() && req.command == Command::ModelLoad);
                fields.insert("model".into(), m.clone());
            }
            if let Some(n) = &req.name {
                assert_eq!(req.command, Command::ModelUnload);
                fields.insert("name".into(), n.clone().into());
            }
            let line = if fields.is_empty() {
                Request::to_line(req.command, req.reason.as_deref(), limit)
            } else {
                Request::to_line_with(req.command, fields)
            };
            let back = parse_request(one_line(&line)).unwrap_or_else(|e| {
                panic!(
                    "re-encoded {:?} does not parse: {e:?}",
                    String::from_utf8_lossy(&line)
                )
            });
            assert_eq!(back.command, req.command);
            assert_eq!(back.reason, req.reason);
            assert_eq!(back.limit, req.limit);
            assert_eq!(back.model, req.model);
            assert_eq!(back.name, req.name);
            assert_eq!(back.id, None);

            // A null result would come back as no result (serde reads
            // `"result":null` as None), so use an object like the server's.
            check_response(Response::ok(
                req.id,
                serde_json::json!({ "state": "active" }),
            ));
        }
        Err(err) => {
            check_id(&err.id);
            assert!(!err.message.is_empty());
            let response = Response::err(err.id, err.code, err.message);
            assert_eq!(response.v, PROTOCOL_VERSION);
            check_response(response);
        }
    }
});
