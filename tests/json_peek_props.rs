//! Property: on any JSON object, the top-level scanner agrees with serde_json about `model`,
//! `stream` and `max_tokens`, and replacing `model` changes nothing else.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tollgate::protocol::json_peek::{peek_request, replace_string_value};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        // Strings with quotes, backslashes, braces, unicode and control characters.
        "[a-z\"\\\\{}\\[\\]:,é😀\\n\\t\\u{0}]{0,12}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z\"\\\\ ]{0,6}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #[test]
    fn scanner_agrees_with_serde(
        mut fields in prop::collection::btree_map("[a-z_]{1,10}", value(), 0..8),
        model in "[a-zA-Z0-9\\-.:@\"\\\\é]{0,30}",
        stream in any::<Option<bool>>(),
        max_tokens in any::<Option<u32>>(),
        pretty in any::<bool>(),
        replacement in "[a-z0-9\\-]{1,40}",
    ) {
        fields.insert("model".into(), Value::String(model.clone()));
        if let Some(s) = stream { fields.insert("stream".into(), Value::Bool(s)); } else { fields.remove("stream"); }
        if let Some(m) = max_tokens { fields.insert("max_tokens".into(), json!(m)); } else { fields.remove("max_tokens"); }
        let doc = Value::Object(fields.into_iter().collect());
        let text = if pretty { serde_json::to_vec_pretty(&doc).unwrap() } else { serde_json::to_vec(&doc).unwrap() };

        let peek = peek_request(&text).unwrap();
        let (found, span) = peek.model.unwrap();
        prop_assert_eq!(&found, &model);
        prop_assert_eq!(peek.stream, stream.unwrap_or(false));
        prop_assert_eq!(peek.max_tokens, max_tokens.map(u64::from));

        // Byte for byte: the same document serialized with the new model.
        let rewritten = replace_string_value(&text, span, &replacement);
        let mut expected = doc.clone();
        expected["model"] = Value::String(replacement.clone());
        let expected = if pretty { serde_json::to_vec_pretty(&expected).unwrap() } else { serde_json::to_vec(&expected).unwrap() };
        prop_assert_eq!(&rewritten[..], &expected[..]);
    }

    #[test]
    fn truncated_documents_are_refused(cut in 0usize..200, fields in prop::collection::btree_map("[a-z]{1,5}", value(), 1..5)) {
        let mut fields = fields;
        fields.insert("model".into(), json!("claude"));
        let text = serde_json::to_vec(&Value::Object(fields.into_iter().collect())).unwrap();
        let cut = cut % text.len();
        prop_assert!(peek_request(&text[..cut]).is_err());
    }
}
