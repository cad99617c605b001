//! Schema-guided conversion between JSON and Avro values.
//! JSON → Avro is what ingest and `tidings produce` use, so every mismatch names the field path
//! (`payload.items[2].quantity`); Avro → JSON is what templates and the gateway see.

use apache_avro::schema::{Name, NamesRef, ResolvedSchema, Schema};
use apache_avro::types::Value;
use serde_json::Value as Json;
use std::collections::HashMap;

use crate::error::CodecError;

/// Converts `json` to an Avro value of `schema`.
///
/// Unions accept either Avro's JSON encoding (`{"OrderPlaced": {...}}`, by simple or full name)
/// or a bare value, which takes the first branch it fits. Missing record fields take their
/// schema default. `timestamp-*` fields accept integers or RFC 3339 strings.
pub fn json_to_avro(schema: &Schema, json: &Json) -> Result<Value, CodecError> {
    let resolved = ResolvedSchema::try_from(schema).map_err(|e| CodecError::Avro(e.to_string()))?;
    let conv = Converter { names: resolved.get_names() };
    conv.convert(schema, json, &mut String::new())
}

struct Converter<'a, 's> {
    names: &'a NamesRef<'s>,
}

fn field_err(path: &str, message: impl Into<String>) -> CodecError {
    CodecError::Field { path: if path.is_empty() { "$".into() } else { path.to_string() }, message: message.into() }
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

impl<'s> Converter<'_, 's> {
    fn lookup(&self, name: &Name) -> Option<&'s Schema> {
        self.names.get(name).copied()
    }

    fn convert(&self, schema: &Schema, json: &Json, path: &mut String) -> Result<Value, CodecError> {
        let expected = |what: &str| field_err(path, format!("expected {what}, found {}", kind(json)));
        Ok(match schema {
            Schema::Null => match json {
                Json::Null => Value::Null,
                _ => return Err(expected("null")),
            },
            Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(|| expected("a boolean"))?),
            Schema::Int => {
                let n = json.as_i64().ok_or_else(|| expected("an integer"))?;
                Value::Int(
                    i32::try_from(n).map_err(|_| field_err(path, format!("{n} does not fit in an int (32-bit)")))?,
                )
            }
            Schema::Long => Value::Long(json.as_i64().ok_or_else(|| expected("an integer"))?),
            Schema::Float => Value::Float(json.as_f64().ok_or_else(|| expected("a number"))? as f32),
            Schema::Double => Value::Double(json.as_f64().ok_or_else(|| expected("a number"))?),
            Schema::String => Value::String(json.as_str().ok_or_else(|| expected("a string"))?.to_owned()),
            Schema::Bytes => Value::Bytes(json.as_str().ok_or_else(|| expected("a string"))?.as_bytes().to_vec()),
            Schema::Uuid(_) => {
                let s = json.as_str().ok_or_else(|| expected("a UUID string"))?;
                Value::Uuid(s.parse().map_err(|_| field_err(path, format!("{s:?} is not a UUID")))?)
            }
            Schema::Date => Value::Date(json.as_i64().ok_or_else(|| expected("days since epoch"))? as i32),
            Schema::TimestampMicros => Value::TimestampMicros(self.timestamp(json, path, 1_000_000)?),
            Schema::TimestampMillis => Value::TimestampMillis(self.timestamp(json, path, 1_000)?),
            Schema::LocalTimestampMicros => Value::LocalTimestampMicros(self.timestamp(json, path, 1_000_000)?),
            Schema::LocalTimestampMillis => Value::LocalTimestampMillis(self.timestamp(json, path, 1_000)?),
            Schema::Enum(e) => {
                let s = json.as_str().ok_or_else(|| expected("an enum symbol"))?;
                let idx = e
                    .symbols
                    .iter()
                    .position(|x| x == s)
                    .ok_or_else(|| field_err(path, format!("{s:?} is not one of {}", e.symbols.join(", "))))?;
                Value::Enum(idx as u32, s.to_owned())
            }
            Schema::Array(a) => {
                let items = json.as_array().ok_or_else(|| expected("an array"))?;
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    out.push(self.convert(&a.items, item, path)?);
                    path.truncate(len);
                }
                Value::Array(out)
            }
            Schema::Map(m) => {
                let obj = json.as_object().ok_or_else(|| expected("an object"))?;
                let mut out = HashMap::with_capacity(obj.len());
                for (k, v) in obj {
                    let len = path.len();
                    path.push_str(&format!("[{k:?}]"));
                    out.insert(k.clone(), self.convert(&m.types, v, path)?);
                    path.truncate(len);
                }
                Value::Map(out)
            }
            Schema::Record(r) => {
                let obj = json.as_object().ok_or_else(|| expected(&format!("an object ({})", r.name.name())))?;
                for key in obj.keys() {
                    if !r.lookup.contains_key(key) {
                        let at = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                        return Err(field_err(
                            &at,
                            format!("unknown field (record {} has no field {key:?})", r.name.name()),
                        ));
                    }
                }
                let mut fields = Vec::with_capacity(r.fields.len());
                for f in &r.fields {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&f.name);
                    let v = match (obj.get(&f.name), &f.default) {
                        (Some(v), _) => self.convert(&f.schema, v, path)?,
                        (None, Some(default)) => self.default_value(&f.schema, default, path)?,
                        (None, None) => return Err(field_err(path, "required field is missing")),
                    };
                    path.truncate(len);
                    fields.push((f.name.clone(), v));
                }
                Value::Record(fields)
            }
            Schema::Union(u) => return self.union(u.variants(), json, path),
            Schema::Ref { name } => {
                let target = self
                    .lookup(name)
                    .ok_or_else(|| field_err(path, format!("schema refers to unknown type {}", name.name())))?;
                return self.convert(target, json, path);
            }
            other => return Err(field_err(path, format!("Avro type {other:?} is not supported for JSON input"))),
        })
    }

    /// Avro defaults for unions apply to the first branch.
    fn default_value(&self, schema: &Schema, default: &Json, path: &mut String) -> Result<Value, CodecError> {
        match schema {
            Schema::Union(u) => {
                let first = u.variants().first().ok_or_else(|| field_err(path, "empty union"))?;
                Ok(Value::Union(0, Box::new(self.convert(first, default, path)?)))
            }
            other => self.convert(other, default, path),
        }
    }

    fn branch_name<'x>(&'x self, s: &'x Schema) -> Option<(&'x str, String)> {
        let name = match s {
            Schema::Record(r) => &r.name,
            Schema::Enum(e) => &e.name,
            Schema::Fixed(f) => &f.name,
            Schema::Ref { name } => name,
            _ => return None,
        };
        Some((name.name(), name.fullname(None)))
    }

    fn union(&self, variants: &[Schema], json: &Json, path: &mut String) -> Result<Value, CodecError> {
        // Avro's JSON encoding: a one-key object naming the branch.
        if let Json::Object(obj) = json {
            if obj.len() == 1 {
                let (key, inner) = obj.iter().next().expect("one entry");
                for (i, v) in variants.iter().enumerate() {
                    let matches = match self.branch_name(v) {
                        Some((simple, full)) => key == simple || *key == full,
                        None => key == primitive_name(v),
                    };
                    if matches {
                        return Ok(Value::Union(i as u32, Box::new(self.convert(v, inner, path)?)));
                    }
                }
            }
        }
        if json.is_null() {
            if let Some(i) = variants.iter().position(|v| matches!(v, Schema::Null)) {
                return Ok(Value::Union(i as u32, Box::new(Value::Null)));
            }
        }
        // A bare value: first branch it fits. Remember the error of the closest record branch so a
        // mistake deep inside (e.g. payload.items[0].quantity) is reported rather than "no branch".
        let mut best: Option<CodecError> = None;
        for (i, v) in variants.iter().enumerate() {
            if matches!(v, Schema::Null) {
                continue;
            }
            let len = path.len();
            match self.convert(v, json, path) {
                Ok(value) => return Ok(Value::Union(i as u32, Box::new(value))),
                Err(e) => {
                    let deeper = matches!(&e, CodecError::Field { path: p, .. } if p.len() > len && p != "$");
                    if best.is_none() || deeper {
                        best = Some(e);
                    }
                }
            }
            path.truncate(len);
        }
        let names: Vec<String> = variants
            .iter()
            .map(|v| self.branch_name(v).map(|(s, _)| s.to_string()).unwrap_or_else(|| primitive_name(v).to_string()))
            .collect();
        match best {
            Some(CodecError::Field { path: p, message }) if p.len() > path.len() && p != "$" => {
                Err(CodecError::Field { path: p, message })
            }
            _ => Err(field_err(path, format!("{} matches no branch of the union [{}]", kind(json), names.join(", ")))),
        }
    }

    fn timestamp(&self, json: &Json, path: &str, per_second: i64) -> Result<i64, CodecError> {
        match json {
            Json::Number(n) => n.as_i64().ok_or_else(|| field_err(path, "timestamp must be an integer")),
            Json::String(s) => {
                let t = chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| field_err(path, format!("{s:?} is not an RFC 3339 timestamp: {e}")))?;
                Ok(match per_second {
                    1_000 => t.timestamp_millis(),
                    _ => t.timestamp_micros(),
                })
            }
            other => Err(field_err(
                path,
                format!("expected a timestamp (integer or RFC 3339 string), found {}", kind(other)),
            )),
        }
    }
}

fn primitive_name(s: &Schema) -> &'static str {
    match s {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int => "int",
        Schema::Long | Schema::TimestampMicros | Schema::TimestampMillis => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes => "bytes",
        Schema::String | Schema::Uuid(_) => "string",
        Schema::Array(_) => "array",
        Schema::Map(_) => "map",
        _ => "?",
    }
}

/// Converts an Avro value to plain JSON: unions become their value, timestamps stay integers.
pub fn avro_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(*i),
        Value::Long(i)
        | Value::TimeMicros(i)
        | Value::TimestampMillis(i)
        | Value::TimestampMicros(i)
        | Value::TimestampNanos(i)
        | Value::LocalTimestampMillis(i)
        | Value::LocalTimestampMicros(i)
        | Value::LocalTimestampNanos(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(f64::from(*f)).map(Json::Number).unwrap_or(Json::Null),
        Value::Double(f) => serde_json::Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        Value::Bytes(b) | Value::Fixed(_, b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::String(s) | Value::Enum(_, s) => Json::String(s.clone()),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Union(_, v) => avro_to_json(v),
        Value::Array(items) => Json::Array(items.iter().map(avro_to_json).collect()),
        Value::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), avro_to_json(v))).collect()),
        Value::Record(fields) => Json::Object(fields.iter().map(|(k, v)| (k.clone(), avro_to_json(v))).collect()),
        other => Json::String(format!("{other:?}")),
    }
}

/// The simple name of the union branch a record field holds, e.g. `OrderPlaced` for `payload`.
pub fn union_branch_name<'a>(schema: &'a Schema, value: &Value, field: &str) -> Option<&'a str> {
    let (Schema::Record(r), Value::Record(fields)) = (schema, value) else { return None };
    let idx = *r.lookup.get(field)?;
    let Schema::Union(u) = &r.fields.get(idx)?.schema else { return None };
    let (_, Value::Union(branch, _)) = fields.get(idx)? else { return None };
    match u.variants().get(*branch as usize)? {
        Schema::Record(rec) => Some(rec.name.name()),
        Schema::Ref { name } => Some(name.name()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
