//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and a simplified
//! strategic merge patch.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` deletes a key, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Strategic merge patch, simplified: like a merge patch, except that lists of objects that
/// all carry a `name` are merged element by element by name (the merge key of containers,
/// env, volumes, volumeMounts and most other built-in lists) and `$`-directives
/// (`$patch`, `$setElementOrder/...`, `$retainKeys`, `$deleteFromPrimitiveList/...`) are
/// dropped rather than interpreted. Other lists are replaced, as merge patch does.
pub(crate) fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    for (key, value) in patch_map {
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Array(items) if is_named_list(items) => {
                let slot = target_map
                    .entry(key.clone())
                    .or_insert(Value::Array(Vec::new()));
                match slot {
                    Value::Array(existing) if is_named_list(existing) => {
                        merge_named_list(existing, items)
                    }
                    _ => *slot = strip_directives(value),
                }
            }
            _ => strategic_merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value),
        }
    }
}

fn is_named_list(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
}

fn merge_named_list(existing: &mut Vec<Value>, patch: &[Value]) {
    for item in patch {
        let name = item.get("name");
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match existing.iter().position(|e| e.get("name") == name) {
            Some(i) if delete => {
                existing.remove(i);
            }
            Some(i) => strategic_merge_patch(&mut existing[i], item),
            None if delete => {}
            None => existing.push(strip_directives(item)),
        }
    }
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// RFC 6902 JSON patch. Errors say which operation failed and why, like the API server's
/// `the server rejected our request due to an error in our request`-style BadRequest texts.
pub(crate) fn json_patch(mut doc: Value, ops: &Value) -> Result<Value, String> {
    let ops = ops
        .as_array()
        .ok_or_else(|| "a JSON patch must be an array of operations".to_owned())?;
    for (i, op) in ops.iter().enumerate() {
        apply_op(&mut doc, op).map_err(|e| format!("operation {i}: {e}"))?;
    }
    Ok(doc)
}

fn str_field<'a>(op: &'a Value, field: &str) -> Result<&'a str, String> {
    op.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string field \"{field}\""))
}

fn apply_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let kind = str_field(op, "op")?;
    let path = str_field(op, "path")?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| format!("\"{kind}\" needs a \"value\""))
    };
    match kind {
        "add" => add(doc, path, value()?),
        "remove" => remove(doc, path).map(drop),
        "replace" => {
            remove(doc, path)?;
            add(doc, path, value()?)
        }
        "move" => {
            let from = str_field(op, "from")?;
            if path.starts_with(&format!("{from}/")) {
                return Err(format!("cannot move {from} into its own child {path}"));
            }
            let moved = remove(doc, from)?;
            add(doc, path, moved)
        }
        "copy" => {
            let from = str_field(op, "from")?;
            let copied = get(doc, from)?.clone();
            add(doc, path, copied)
        }
        "test" => {
            let want = value()?;
            if get(doc, path)? == &want {
                Ok(())
            } else {
                Err(format!("testing value {path} failed"))
            }
        }
        other => Err(format!("unknown operation \"{other}\"")),
    }
}

/// Splits an RFC 6901 pointer into unescaped tokens.
fn tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("path \"{path}\" does not start with /"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let i: usize = token
        .parse()
        .map_err(|_| format!("\"{token}\" is not an array index"))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(format!("array index {i} out of bounds"));
    }
    Ok(i)
}

fn get<'a>(doc: &'a Value, path: &str) -> Result<&'a Value, String> {
    let mut cur = doc;
    for t in tokens(path)? {
        cur = match cur {
            Value::Object(m) => m
                .get(&t)
                .ok_or_else(|| format!("path {path} does not exist"))?,
            Value::Array(a) => &a[index(&t, a.len(), false)?],
            _ => return Err(format!("path {path} does not exist")),
        };
    }
    Ok(cur)
}

fn parent<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let mut toks = tokens(path)?;
    let last = toks
        .pop()
        .ok_or_else(|| "the whole document cannot be the target".to_owned())?;
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(&t)
                .ok_or_else(|| format!("path {path} does not exist"))?,
            Value::Array(a) => {
                let i = index(&t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(format!("path {path} does not exist")),
        };
    }
    Ok((cur, last))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (container, last) = parent(doc, path)?;
    match container {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = index(&last, a.len(), true)?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("path {path} does not exist")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (container, last) = parent(doc, path)?;
    match container {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("path {path} does not exist")),
        Value::Array(a) => {
            let i = index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("path {path} does not exist")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": ["b"]}),
                json!({"a": ["c", "d"]}),
                json!({"a": ["c", "d"]}),
            ),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (json!(["a"]), json!({"a": "b"}), json!({"a": "b"})),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn strategic_merge_merges_named_lists_and_drops_directives() {
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "b", "image": "z"}, {"name": "c", "image": "w"}, {"name": "a", "$patch": "delete"}]
        }});
        strategic_merge_patch(&mut pod, &patch);
        assert_eq!(
            pod,
            json!({"spec": {"containers": [{"name": "b", "image": "z"}, {"name": "c", "image": "w"}]}})
        );
        let mut cm = json!({"data": {"a": "1", "b": "2"}});
        strategic_merge_patch(&mut cm, &json!({"data": {"a": null, "c": "3"}}));
        assert_eq!(cm, json!({"data": {"b": "2", "c": "3"}}));
    }

    #[test]
    fn json_patch_operations() {
        let doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        let cases = [
            (
                json!([{"op": "add", "path": "/a/b/-", "value": 3}]),
                Ok(json!({"a": {"b": [1, 2, 3]}, "c": "x"})),
            ),
            (
                json!([{"op": "add", "path": "/a/b/0", "value": 0}]),
                Ok(json!({"a": {"b": [0, 1, 2]}, "c": "x"})),
            ),
            (
                json!([{"op": "remove", "path": "/c"}]),
                Ok(json!({"a": {"b": [1, 2]}})),
            ),
            (
                json!([{"op": "replace", "path": "/c", "value": "y"}]),
                Ok(json!({"a": {"b": [1, 2]}, "c": "y"})),
            ),
            (
                json!([{"op": "move", "from": "/c", "path": "/d"}]),
                Ok(json!({"a": {"b": [1, 2]}, "d": "x"})),
            ),
            (
                json!([{"op": "copy", "from": "/c", "path": "/a/e"}]),
                Ok(json!({"a": {"b": [1, 2], "e": "x"}, "c": "x"})),
            ),
            (
                json!([{"op": "test", "path": "/c", "value": "x"}]),
                Ok(doc.clone()),
            ),
            (
                json!([{"op": "test", "path": "/c", "value": "y"}]),
                Err("operation 0: testing value /c failed"),
            ),
            (
                json!([{"op": "replace", "path": "/nope", "value": 1}]),
                Err("operation 0: path /nope does not exist"),
            ),
            (
                json!([{"op": "remove", "path": "/a/b/5"}]),
                Err("operation 0: array index 5 out of bounds"),
            ),
            (
                json!([{"op": "frob", "path": "/c"}]),
                Err("operation 0: unknown operation \"frob\""),
            ),
            (
                json!({"op": "add"}),
                Err("a JSON patch must be an array of operations"),
            ),
        ];
        for (ops, want) in cases {
            let got = json_patch(doc.clone(), &ops);
            match want {
                Ok(v) => assert_eq!(got, Ok(v), "ops {ops}"),
                Err(e) => assert_eq!(got, Err(e.to_owned()), "ops {ops}"),
            }
        }
        let escaped = json_patch(
            json!({"a/b": {"~": 1}}),
            &json!([{"op": "remove", "path": "/a~1b/~0"}]),
        );
        assert_eq!(escaped, Ok(json!({"a/b": {}})));
    }
}
