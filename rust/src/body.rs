//! A client's request body, read once: its top-level fields, and the same bytes with a few top-level fields
//! replaced (the upstream's model name, `stream_options`), spliced in rather than re-encoded.
//!
//! The proxy needs only the top-level scalars of a request (model, stream, the output caps...), never the
//! messages: an agent's long context stays in the raw bytes, is validated as JSON without being built into
//! objects, and reaches the upstream as the client sent it.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

/// Why a body cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("the request body is not valid JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("the request body must be a JSON object")]
    NotObject,
    /// `patch_at` was given the spans of another body.
    #[error("the spans are of another body")]
    Spans,
}

/// One top-level member: its key and its value's bytes in the body.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    /// The key, unescaped.
    pub key: Cow<'a, str>,
    /// The value as it appears in the body.
    pub value: &'a RawValue,
}

struct Members<'a>(Vec<Member<'a>>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((key, value)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push(Member { key, value });
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The top-level members of `raw`, in order (a key sent twice appears twice; the last one is the value, as for
/// every JSON parser the proxy's peers use). The whole body is validated.
pub fn members(raw: &[u8]) -> Result<Vec<Member<'_>>, BodyError> {
    let first = raw.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        // Valid JSON that is not an object is the other error; invalid JSON stays a JSON error.
        return Err(match serde_json::from_slice::<&RawValue>(raw) {
            Ok(_) => BodyError::NotObject,
            Err(e) => BodyError::Json(e.to_string()),
        });
    }
    serde_json::from_slice::<Members<'_>>(raw)
        .map(|m| m.0)
        .map_err(|e| BodyError::Json(e.to_string()))
}

/// Where each top-level member's value lies in a body: what [`patch_at`] needs, so a body read once (its members
/// found while reading the fields) is patched without being parsed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spans {
    /// The length of the body these spans are of (a check against patching another body with them).
    len: usize,
    members: Vec<(String, Range<usize>)>,
}

impl Spans {
    /// The spans of `members`, which [`members`] found in `raw`.
    pub fn of(raw: &[u8], members: &[Member<'_>]) -> Self {
        let base = raw.as_ptr() as usize;
        let members = members
            .iter()
            .map(|m| {
                let text = m.value.get();
                let start = text.as_ptr() as usize - base;
                (m.key.clone().into_owned(), start..start + text.len())
            })
            .collect();
        Spans {
            len: raw.len(),
            members,
        }
    }
}

/// `raw` with the top-level members named in `set` given the raw JSON values there (every occurrence of a key
/// sent twice), and those not present added at the end. `set` values must be valid JSON (the caller encodes
/// them); keys are encoded here.
pub fn patch(raw: &[u8], set: &[(&str, &[u8])]) -> Result<Vec<u8>, BodyError> {
    let members = members(raw)?;
    patch_at(raw, &Spans::of(raw, &members), set)
}

/// [`patch`] with the members' spans already known (`Spans::of` the same `raw`); an error if they are of a body
/// of another length.
pub fn patch_at(raw: &[u8], spans: &Spans, set: &[(&str, &[u8])]) -> Result<Vec<u8>, BodyError> {
    let plan = Plan::new(raw, spans, set)?;
    let mut out = Vec::with_capacity(plan.len());
    plan.emit(|piece| out.extend_from_slice(piece));
    Ok(out)
}

/// The patched body as the pieces to write: what of `raw` to keep and what to put between.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    raw: &'a [u8],
    /// Member values replaced, in order.
    edits: Vec<(Range<usize>, &'a [u8])>,
    /// Members added before the closing brace (encoded keys).
    added: Vec<(String, &'a [u8])>,
    /// Where the closing brace is, and whether a comma goes before the first added member.
    close: usize,
    comma: bool,
}

impl<'a> Plan<'a> {
    /// The plan for [`patch_at`].
    pub fn new(raw: &'a [u8], spans: &Spans, set: &[(&str, &'a [u8])]) -> Result<Self, BodyError> {
        if spans.len != raw.len() {
            return Err(BodyError::Spans);
        }
        let mut edits = Vec::new();
        let mut added = Vec::new();
        for &(key, value) in set {
            let before = edits.len();
            edits.extend(
                spans
                    .members
                    .iter()
                    .filter(|(k, _)| k == key)
                    .map(|(_, r)| (r.clone(), value)),
            );
            if edits.len() == before {
                added.push((serde_json::to_string(key).unwrap_or_default(), value));
            }
        }
        edits.sort_unstable_by_key(|e| e.0.start);
        // Before the closing brace (the last one: what follows it is whitespace).
        let close = if added.is_empty() {
            raw.len()
        } else {
            raw.iter().rposition(|&b| b == b'}').unwrap_or(raw.len())
        };
        Ok(Plan {
            raw,
            edits,
            added,
            close,
            comma: !spans.members.is_empty(),
        })
    }

    /// The patched body's length.
    pub fn len(&self) -> usize {
        let mut n = self.raw.len();
        for (range, value) in &self.edits {
            n = n - range.len() + value.len();
        }
        for (i, (key, value)) in self.added.iter().enumerate() {
            n += usize::from(i > 0 || self.comma) + key.len() + 1 + value.len();
        }
        n
    }

    /// Hands the patched body to `put`, piece by piece, in order.
    pub fn emit(&self, mut put: impl FnMut(&[u8])) {
        let raw = self.raw;
        let mut at = 0;
        for (range, value) in &self.edits {
            put(&raw[at..range.start]);
            put(value);
            at = range.end;
        }
        put(&raw[at..self.close]);
        for (i, (key, value)) in self.added.iter().enumerate() {
            if i > 0 || self.comma {
                put(b",");
            }
            put(key.as_bytes());
            put(b":");
            put(value);
        }
        put(&raw[self.close..]);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;

    fn parsed(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn members_in_order_with_escaped_keys() {
        let raw = br#" {"model": "m", "mo\u0064el2": [1, {"a": 2}], "stream": true} "#;
        let m = members(raw).unwrap();
        let keys: Vec<&str> = m.iter().map(|m| m.key.as_ref()).collect();
        assert_eq!(keys, ["model", "model2", "stream"]);
        assert_eq!(m[1].value.get(), r#"[1, {"a": 2}]"#);
    }

    #[test]
    fn errors() {
        assert_eq!(members(b"[1, 2]").unwrap_err(), BodyError::NotObject);
        assert_eq!(members(b"\"text\"").unwrap_err(), BodyError::NotObject);
        assert!(matches!(members(b"{not json"), Err(BodyError::Json(_))));
        assert!(matches!(
            members(b"{\"a\": 1} trailing"),
            Err(BodyError::Json(_))
        ));
        assert!(matches!(members(b""), Err(BodyError::Json(_))));
        assert!(matches!(members(b"[1, 2"), Err(BodyError::Json(_))));
    }

    #[test]
    fn patch_replaces_and_appends() {
        let raw = br#"{"model": "alias", "messages": [{"role": "user", "content": "hi \"there\""}], "stream": true}"#;
        let out = patch(
            raw,
            &[
                ("model", br#""upstream-model""#),
                ("stream_options", br#"{"include_usage":true}"#),
            ],
        )
        .unwrap();
        assert_eq!(
            parsed(&out),
            json!({"model": "upstream-model", "messages": [{"role": "user", "content": "hi \"there\""}],
                   "stream": true, "stream_options": {"include_usage": true}})
        );
        // The messages' bytes are the client's, untouched.
        assert!(out
            .windows(40)
            .any(|w| w == &br#"[{"role": "user", "content": "hi \"there\""#[..40]));
        assert_eq!(
            parsed(&patch(b"{}", &[("model", b"\"m\"")]).unwrap()),
            json!({"model": "m"})
        );
        assert_eq!(
            patch(b" { } \n", &[("a", b"1")]).unwrap(),
            b" { \"a\":1} \n"
        );
    }

    #[test]
    fn patch_at_known_spans_is_patch() {
        let raw = br#"{"model": "a", "x": [1, 2], "model": "b"}"#;
        let spans = Spans::of(raw, &members(raw).unwrap());
        let set: &[(&str, &[u8])] = &[("model", b"\"c\""), ("stream", b"true")];
        assert_eq!(
            patch_at(raw, &spans, set).unwrap(),
            patch(raw, set).unwrap()
        );
        assert_eq!(patch_at(b"{}", &spans, set).unwrap_err(), BodyError::Spans);
    }

    #[test]
    fn patch_replaces_a_key_sent_twice() {
        let out = patch(
            br#"{"model": "a", "x": 1, "model": "b"}"#,
            &[("model", b"\"c\"")],
        )
        .unwrap();
        assert_eq!(out, br#"{"model": "c", "x": 1, "model": "c"}"#);
    }

    fn small_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|i| json!(i)),
            "[a-z \"\\\\é\n]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the body, the patched bytes parse to the body with those members set.
        #[test]
        fn patch_equals_set_members(
            fields in proptest::collection::btree_map("[a-z]{1,6}", small_json(), 0..6),
            model in "[a-z0-9/-]{1,20}",
            pretty in any::<bool>(),
        ) {
            let body = Value::Object(fields.into_iter().collect());
            let raw = if pretty { serde_json::to_vec_pretty(&body) } else { serde_json::to_vec(&body) }.unwrap();
            let model_json = serde_json::to_vec(&model).unwrap();
            let set: &[(&str, &[u8])] = &[("model", &model_json), ("stream", b"true")];
            let out = patch(&raw, set).unwrap();
            let spans = Spans::of(&raw, &members(&raw).unwrap());
            prop_assert_eq!(out.len(), Plan::new(&raw, &spans, set).unwrap().len());
            let mut expected = body.as_object().unwrap().clone();
            expected.insert("model".into(), json!(model));
            expected.insert("stream".into(), json!(true));
            prop_assert_eq!(parsed(&out), Value::Object(expected));
        }
    }
}
