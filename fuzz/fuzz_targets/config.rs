//! The TOML configuration: `ccnode_agent::config::Config::parse`.
//!
//! Beyond "no panic" (and no stack overflow on deep nesting), checks that
//! whatever `parse` accepts passes `validate` and yields usable socket mode
//! bits, and that what it refuses is a parse or validation error, never a
//! file error (`parse` reads no files), and displays without panicking.
#![no_main]

use ccnode_agent::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Config::load refuses non-UTF-8 files before it parses.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            config.validate().expect("a parsed config validates");
            let bits = config
                .admin
                .mode_bits()
                .expect("a parsed config has mode bits");
            assert_eq!(bits & !0o777, 0);
            assert_eq!(bits & 0o600, 0o600);
            assert!((1..=64).contains(&config.node.worker_threads));
        }
        Err(err) => {
            // The key may be empty: TOML allows `"" = 1`, and the error then
            // names that key faithfully.
            let _shown = err.to_string();
            match &err {
                ConfigError::Parse { .. } | ConfigError::Invalid { .. } => {}
                other => panic!("Config::parse returned a file error: {other:?}"),
            }
        }
    }
});
