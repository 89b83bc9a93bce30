//! Small helpers shared by the benchmark harnesses (`benches/`): run sizes
//! from the environment, so a quick run is one variable away.

/// `key` parsed as a number, or `default` when unset. Panics on a value
/// that is not a number: a mistyped scale must not silently measure less.
pub fn env_f64(key: &str, default: f64) -> f64 {
    match std::env::var(key) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// A count: the variable if set, else `default`, times `scale`, and at
/// least `floor`.
pub fn count(key: &str, default: usize, scale: f64, floor: usize) -> usize {
    let base = env_f64(key, default as f64);
    ((base * scale).round() as usize).max(floor)
}
