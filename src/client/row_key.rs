//! Row keys: the `metadata` entry that lets the client find a run it may already have
//! created, since add-runs has no idempotency key.

use serde_json::Value;

use crate::api::{self, TaskRunInput};

/// The metadata key holding each run's row key.
pub const ROW_KEY: &str = "gf_row";

/// The metadata key holding the row of the submitting ledger that claimed the run (an
/// integer), by which its result is stored without a lookup by key. Only a hint: whoever
/// reads it checks that the row is still that key's.
pub const LEDGER_ROW: &str = "gf_ledger_row";

/// The row key of an input or run metadata value: strings as they are, numbers and
/// booleans in their JSON form.
pub fn row_key_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The row key already set on `input`, if any.
pub fn row_key_of(input: &TaskRunInput) -> Option<String> {
    input
        .metadata
        .as_ref()?
        .get(ROW_KEY)
        .and_then(row_key_value)
}

/// A row key for an input that has none: a stable 64-bit hash of the input's JSON and its
/// position in the submission, so identical inputs submitted together stay distinct and the
/// same inputs in the same order always get the same keys.
pub fn derive_row_key(input: &TaskRunInput, ordinal: u64) -> String {
    let mut h = Fnv64::new();
    // Serializing a TaskRunInput cannot fail: every field is plain JSON data.
    if let Ok(bytes) = serde_json::to_vec(input) {
        h.write(&bytes);
    }
    h.write(&ordinal.to_le_bytes());
    format!("h{:016x}", h.finish())
}

/// `key` when a metadata value can hold it (the API bounds their length).
pub(crate) fn check_row_key(key: String) -> Result<String, String> {
    if key.chars().count() > api::MAX_METADATA_VALUE_CHARS {
        return Err(format!(
            "metadata `{ROW_KEY}` is longer than {} characters",
            api::MAX_METADATA_VALUE_CHARS
        ));
    }
    Ok(key)
}

/// Makes sure `input` carries a usable row key, deriving one when absent, and returns it.
pub(crate) fn ensure_row_key(input: &mut TaskRunInput, ordinal: u64) -> Result<String, String> {
    if let Some(v) = input.metadata.as_ref().and_then(|m| m.get(ROW_KEY)) {
        let key = row_key_value(v).ok_or_else(|| {
            format!(
                "metadata `{ROW_KEY}` must be a string, number or boolean, not {}",
                api::json_kind(v)
            )
        })?;
        return check_row_key(key);
    }
    let key = derive_row_key(input, ordinal);
    input
        .metadata
        .get_or_insert_with(Default::default)
        .insert(ROW_KEY.to_string(), Value::String(key.clone()));
    Ok(key)
}

/// FNV-1a with a final avalanche step: small, fast, and the same on every platform and
/// Rust version (unlike `DefaultHasher`).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        // splitmix64's finalizer spreads FNV's weak high bits.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{PreparedMetadata, PreparedRunInput, RunInputBody};
    use serde_json::json;

    #[test]
    fn key_name_fits_the_metadata_limit() {
        assert!(ROW_KEY.len() <= api::MAX_METADATA_KEY_CHARS);
    }

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let a = TaskRunInput::new(json!({"q": "a"}), "lite");
        let b = TaskRunInput::new(json!({"q": "b"}), "lite");
        assert_eq!(derive_row_key(&a, 0), derive_row_key(&a.clone(), 0));
        assert_ne!(derive_row_key(&a, 0), derive_row_key(&a, 1));
        assert_ne!(derive_row_key(&a, 0), derive_row_key(&b, 0));
        // Pinned, so a change of the hash (which would orphan existing keys) is noticed.
        assert_eq!(derive_row_key(&a, 0).len(), 17);
        assert_eq!(derive_row_key(&a, 0), "hf01d8db39851bc61");
    }

    #[test]
    fn ensure_keeps_given_keys_and_checks_them() {
        let mut i = TaskRunInput::new(json!("x"), "lite");
        let k = ensure_row_key(&mut i, 3).unwrap();
        assert_eq!(row_key_of(&i), Some(k));
        let mut i = TaskRunInput::new(json!("x"), "lite");
        i.metadata = Some(serde_json::from_value(json!({ROW_KEY: 42})).unwrap());
        assert_eq!(ensure_row_key(&mut i, 0).unwrap(), "42");
        i.metadata = Some(serde_json::from_value(json!({ROW_KEY: [1]})).unwrap());
        assert!(ensure_row_key(&mut i, 0).unwrap_err().contains("not array"));
        // Too long for a metadata value: refused, given in a run input or a prepared one.
        let long = "k".repeat(api::MAX_METADATA_VALUE_CHARS + 1);
        i.metadata = Some(serde_json::from_value(json!({ROW_KEY: long})).unwrap());
        assert!(
            ensure_row_key(&mut i, 0)
                .unwrap_err()
                .contains("longer than")
        );
        let mut prepared = PreparedRunInput {
            input: serde_json::value::to_raw_value("x").unwrap(),
            processor: "lite".into(),
            metadata: PreparedMetadata {
                row_key: long[1..].to_string(),
                ledger_row: None,
            },
        };
        assert_eq!(prepared.row_key(0).unwrap(), long[1..]);
        prepared.metadata.row_key = long;
        assert!(prepared.row_key(0).unwrap_err().contains("longer than"));
    }
}
