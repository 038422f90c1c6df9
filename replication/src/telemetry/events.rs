//! The structured event log (`--events FILE`): one JSON object per line, appended, each
//! with `ts` (RFC 3339, UTC, milliseconds), `ts_ms` (Unix milliseconds), `pid`, `event`
//! and the event's own fields. Every line is one `write` on a file opened with `O_APPEND`,
//! made before the process can exit on what the event reports (a fenced primary exits in
//! the same call that logs it), so a drill's log is complete.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// An event log file.
pub struct EventLog {
    file: Mutex<File>,
}

impl EventLog {
    /// Opens (creates, appends to) `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends event `name` with `fields`.
    pub fn write(&self, name: &str, fields: Map<String, Value>) {
        let line = line(SystemTime::now(), name, fields);
        let mut file = match self.file.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!("cannot write the event log: {e}");
        }
    }
}

/// The JSON line of one event at `at`.
pub fn line(at: SystemTime, name: &str, fields: Map<String, Value>) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut object = Map::new();
    object.insert("ts".into(), Value::from(rfc3339(ms)));
    object.insert("ts_ms".into(), Value::from(ms));
    object.insert("pid".into(), Value::from(std::process::id()));
    object.insert("event".into(), Value::from(name));
    object.extend(fields);
    let mut line = Value::Object(object).to_string();
    line.push('\n');
    line
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
pub fn rfc3339(ms: u64) -> String {
    let t = ftvm_vmm::devices::rtc::civil(ms / 1000);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
        ms % 1000
    )
}

/// Builds an event's fields: `fields!("why" => why, "epoch" => 3)`.
#[macro_export]
macro_rules! fields {
    ($($k:expr => $v:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut m = serde_json::Map::new();
        $( m.insert(String::from($k), serde_json::Value::from($v)); )*
        m
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_line_is_one_json_object() {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1500);
        let l = line(
            at,
            "failover",
            crate::fields!("why" => "primary closed", "epoch" => 7),
        );
        assert!(l.ends_with('\n') && l.matches('\n').count() == 1);
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["event"], "failover");
        assert_eq!(v["ts"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["ts_ms"], 1500);
        assert_eq!(v["why"], "primary closed");
        assert_eq!(v["epoch"], 7);
    }
}
