//! The etcd arbiter (DESIGN.md §5): the pair's term kept in an etcd cluster instead of an
//! embedded `ftvm witness`, for sites that run etcd already.
//!
//! Per protected VM two keys under `/ftvm/pairs/VM_ID/`: `term` (the term, in decimal) and
//! `holder` (who won it). A claim of term `expected + 1` is one etcd transaction:
//!
//! - compare: `term` holds `expected` (for `expected == 0`: `term` was never created);
//! - success: put `term = expected + 1` and `holder = claimant`;
//! - failure: read `term` and `holder`.
//!
//! etcd applies the transaction through Raft on a quorum before it answers, so of two sides
//! that claim the same term exactly one wins, on any member, across restarts of any of them.
//! A claimant whose answer was lost (a timeout, a member that died after committing) asks
//! again, on the next endpoint, and hears that it holds the term already: granted again,
//! as the witness does.
//!
//! The client speaks etcd's v3 JSON gateway (`POST /v3/kv/txn`, keys and values in base64)
//! over plain HTTP with `ureq`, a blocking client: claims already run on a helper thread of
//! their own ([`crate::witness::spawn_claim`]), so an async gRPC stack (tokio, tonic) would
//! only add a runtime to run one request at a time. Every answer is bounded (1 MiB) and
//! checked; a broken one counts as an unreachable arbiter (waiting), never as a verdict.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::witness::{Verdict, WitnessError};

/// Where the etcd cluster is (`--etcd ENDPOINTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The client URLs of the members (`http://host:port`), asked in this order.
    pub endpoints: Vec<String>,
    /// The key prefix of ftvm's pairs.
    pub prefix: String,
}

/// The key prefix of ftvm's pairs in etcd.
pub const PREFIX: &str = "/ftvm/pairs/";

/// The largest answer read from a member.
const MAX_ANSWER: u64 = 1 << 20;

impl EtcdConfig {
    /// Parses `ENDPOINTS`: a comma-separated list of `http://host:port` or `host:port`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut endpoints = Vec::new();
        for e in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let url = if e.starts_with("https://") {
                return Err(format!(
                    "etcd endpoint {e}: https is not supported (plain http on a trusted network)"
                ));
            } else if e.starts_with("http://") {
                e.trim_end_matches('/').to_string()
            } else if e.contains("://") {
                return Err(format!("etcd endpoint {e}: not an http:// URL"));
            } else {
                format!("http://{}", e.trim_end_matches('/'))
            };
            if url.len() <= "http://".len() {
                return Err(format!("etcd endpoint {e}: no host"));
            }
            endpoints.push(url);
        }
        if endpoints.is_empty() {
            return Err(
                "--etcd needs at least one endpoint (host:port or http://host:port)".into(),
            );
        }
        Ok(Self {
            endpoints,
            prefix: PREFIX.into(),
        })
    }

    /// The members, for messages.
    pub fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    fn keys(&self, vm_id: &str) -> (String, String) {
        (
            format!("{}{vm_id}/term", self.prefix),
            format!("{}{vm_id}/holder", self.prefix),
        )
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// Claims term `expected_term + 1` of `vm_id` for `claimant` (see the module's doc).
pub fn claim(
    config: &EtcdConfig,
    vm_id: &str,
    expected_term: u64,
    claimant: &str,
    timeout: Duration,
) -> Result<Verdict, WitnessError> {
    let (term_key, holder_key) = config.keys(vm_id);
    let next = expected_term
        .checked_add(1)
        .ok_or_else(|| failed(config, "the term cannot grow past u64::MAX".into()))?;
    let compare = if expected_term == 0 {
        json!({"key": b64(&term_key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
    } else {
        json!({"key": b64(&term_key), "target": "VALUE", "result": "EQUAL", "value": b64(&expected_term.to_string())})
    };
    let body = json!({
        "compare": [compare],
        "success": [
            {"request_put": {"key": b64(&term_key), "value": b64(&next.to_string())}},
            {"request_put": {"key": b64(&holder_key), "value": b64(claimant)}},
        ],
        "failure": [
            {"request_range": {"key": b64(&term_key)}},
            {"request_range": {"key": b64(&holder_key)}},
        ],
    });
    let answer = post(config, "/v3/kv/txn", &body, timeout)?;
    if answer.get("succeeded").and_then(Value::as_bool) == Some(true) {
        return Ok(Verdict::Granted { term: next });
    }
    let (term, holder) = read_term(config, &answer)?;
    if term == next && holder == claimant {
        // Won before, with the answer lost: granted again.
        return Ok(Verdict::Granted { term });
    }
    if term == expected_term {
        return Err(failed(
            config,
            format!("the transaction failed although {term_key} holds term {term}"),
        ));
    }
    Ok(Verdict::Refused { term, holder })
}

/// The term of `vm_id` now and its holder (0 and "" for a VM never claimed).
pub fn query(
    config: &EtcdConfig,
    vm_id: &str,
    timeout: Duration,
) -> Result<(u64, String), WitnessError> {
    let (term_key, holder_key) = config.keys(vm_id);
    let body = json!({
        "success": [
            {"request_range": {"key": b64(&term_key)}},
            {"request_range": {"key": b64(&holder_key)}},
        ],
    });
    let answer = post(config, "/v3/kv/txn", &body, timeout)?;
    read_term(config, &answer)
}

fn failed(config: &EtcdConfig, why: String) -> WitnessError {
    WitnessError::Failed {
        addr: format!("etcd {}", config.describe()),
        why,
    }
}

/// The field `snake` of `v`, also under its camelCase name (the gateway's marshaller may
/// use either).
fn field<'a>(v: &'a Value, snake: &str) -> Option<&'a Value> {
    v.get(snake).or_else(|| {
        let mut camel = String::new();
        let mut up = false;
        for c in snake.chars() {
            if c == '_' {
                up = true;
            } else if up {
                camel.extend(c.to_uppercase());
                up = false;
            } else {
                camel.push(c);
            }
        }
        v.get(camel)
    })
}

/// The value of the first key the `i`-th range of a transaction's answer found (None: the
/// key does not exist).
fn range_value(
    config: &EtcdConfig,
    answer: &Value,
    i: usize,
) -> Result<Option<String>, WitnessError> {
    let bad = |why: &str| failed(config, format!("unexpected answer ({why}): {answer}"));
    let response = field(answer, "responses")
        .and_then(|r| r.get(i))
        .ok_or_else(|| bad("a range is missing"))?;
    let range = field(response, "response_range").ok_or_else(|| bad("not a range"))?;
    let Some(kv) = field(range, "kvs").and_then(|k| k.get(0)) else {
        return Ok(None);
    };
    let value = match field(kv, "value") {
        None => return Ok(Some(String::new())),
        Some(v) => v.as_str().ok_or_else(|| bad("a value is not a string"))?,
    };
    let bytes = B64
        .decode(value)
        .map_err(|_| bad("a value is not base64"))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| bad("a value is not UTF-8"))
}

/// The term and holder read by a transaction's two ranges.
fn read_term(config: &EtcdConfig, answer: &Value) -> Result<(u64, String), WitnessError> {
    let term = match range_value(config, answer, 0)? {
        None => 0,
        Some(t) => t
            .parse()
            .map_err(|_| failed(config, format!("the term key holds {t:?}, not a term")))?,
    };
    let holder = range_value(config, answer, 1)?.unwrap_or_default();
    Ok((term, holder))
}

/// Posts `body` to `path` on the first member that answers 200 with JSON.
fn post(
    config: &EtcdConfig,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, WitnessError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(None)
        .max_idle_connections(0)
        .build()
        .into();
    let text = body.to_string();
    let mut errors = Vec::new();
    for endpoint in &config.endpoints {
        match post_one(&agent, endpoint, path, &text) {
            Ok(v) => return Ok(v),
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
    }
    Err(WitnessError::Unreachable {
        addr: format!("etcd {}", config.describe()),
        why: errors.join("; "),
    })
}

fn post_one(agent: &ureq::Agent, endpoint: &str, path: &str, body: &str) -> Result<Value, String> {
    let mut response = agent
        .post(format!("{endpoint}{path}"))
        .content_type("application/json")
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", text.trim()));
    }
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EtcdConfig {
        EtcdConfig::parse("127.0.0.1:2379").expect("parse")
    }

    #[test]
    fn endpoints_parse() {
        let c = EtcdConfig::parse("http://a:1/, b:2 ,").expect("parse");
        assert_eq!(c.endpoints, ["http://a:1", "http://b:2"]);
        assert!(EtcdConfig::parse("").is_err());
        assert!(EtcdConfig::parse("https://a:1").is_err());
        assert!(EtcdConfig::parse("unix://x").is_err());
        assert!(EtcdConfig::parse("http://").is_err());
    }

    #[test]
    fn answers_are_read_in_either_spelling() {
        let snake = json!({"responses": [
            {"response_range": {"kvs": [{"key": b64("k"), "value": b64("3")}]}},
            {"response_range": {"kvs": [{"key": b64("h"), "value": b64("standby")}]}},
        ]});
        assert_eq!(
            read_term(&config(), &snake).expect("read"),
            (3, "standby".into())
        );
        let camel = json!({"responses": [
            {"responseRange": {"kvs": [{"value": b64("7")}]}},
            {"responseRange": {}},
        ]});
        assert_eq!(
            read_term(&config(), &camel).expect("read"),
            (7, String::new())
        );
        let never = json!({"responses": [{"response_range": {}}, {"response_range": {}}]});
        assert_eq!(
            read_term(&config(), &never).expect("read"),
            (0, String::new())
        );
    }

    #[test]
    fn broken_answers_are_errors_not_verdicts() {
        for bad in [
            json!({}),
            json!({"responses": [{"response_put": {}}]}),
            json!({"responses": [{"response_range": {"kvs": [{"value": "%%%"}]}}]}),
            json!({"responses": [{"response_range": {"kvs": [{"value": 5}]}}]}),
            json!({"responses": [{"response_range": {"kvs": [{"value": b64("x")}]}}, {"response_range": {}}]}),
        ] {
            assert!(read_term(&config(), &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_member_answering_is_unreachable() {
        // Port 1 on loopback: nothing listens there.
        let c = EtcdConfig::parse("127.0.0.1:1").expect("parse");
        let e = claim(&c, "vm", 0, "me", Duration::from_secs(1)).expect_err("no etcd");
        assert!(matches!(e, WitnessError::Unreachable { .. }), "{e}");
    }
}
