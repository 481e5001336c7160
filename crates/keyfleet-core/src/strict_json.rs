//! JSON parsing that refuses duplicate object members at any depth.
//!
//! serde_json keeps the last of two members with the same name; for a JWT that lets an
//! attacker smuggle a second `exp` or `alg` past a parser that reads the first. Header and
//! claims are parsed with [`parse_object`] instead.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Parses `bytes` as a JSON object, refusing duplicate members anywhere inside it.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let StrictValue(value) = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err("not a JSON object".to_owned()),
    }
}

/// A JSON value parsed to its end even when it holds duplicate members somewhere inside: the
/// duplicate is reported in place of the value instead of failing the whole document, so one bad
/// entry of a list (a JWKS `keys` array) can be skipped while its neighbours still apply.
pub(crate) struct Tolerant(pub(crate) Result<Value, String>);

impl<'de> Deserialize<'de> for Tolerant {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TolerantVisitor)
    }
}

struct TolerantVisitor;

impl<'de> Visitor<'de> for TolerantVisitor {
    type Value = Tolerant;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Tolerant, E> {
        Ok(Tolerant(Ok(Value::Bool(v))))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Tolerant, E> {
        Ok(Tolerant(Ok(Value::from(v))))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Tolerant, E> {
        Ok(Tolerant(Ok(Value::from(v))))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Tolerant, E> {
        let v = serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
        Ok(Tolerant(Ok(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Tolerant, E> {
        Ok(Tolerant(Ok(Value::String(v.to_owned()))))
    }
    fn visit_string<E>(self, v: String) -> Result<Tolerant, E> {
        Ok(Tolerant(Ok(Value::String(v))))
    }
    fn visit_unit<E>(self) -> Result<Tolerant, E> {
        Ok(Tolerant(Ok(Value::Null)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tolerant, A::Error> {
        let mut out = Ok(Vec::new());
        while let Some(Tolerant(v)) = seq.next_element()? {
            match (&mut out, v) {
                (Ok(items), Ok(v)) => items.push(v),
                (Ok(_), Err(e)) => out = Err(e),
                (Err(_), _) => {}
            }
        }
        Ok(Tolerant(out.map(Value::Array)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tolerant, A::Error> {
        let mut out = Ok(Map::new());
        while let Some(key) = map.next_key::<String>()? {
            let Tolerant(v) = map.next_value()?;
            if let Ok(members) = &mut out {
                match v {
                    Err(e) => out = Err(e),
                    Ok(v) => {
                        if members.insert(key.clone(), v).is_some() {
                            out = Err(format!("duplicate member {key:?}"));
                        }
                    }
                }
            }
        }
        Ok(Tolerant(out.map(Value::Object)))
    }
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.insert(key.clone(), v).is_some() {
                return Err(de::Error::custom(format!("duplicate member {key:?}")));
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_object;

    #[test]
    fn refuses_duplicates_at_any_depth() {
        let cases: &[(&str, bool)] = &[
            (r#"{"a":1,"b":2}"#, true),
            (r#"{"a":1,"a":2}"#, false),
            (r#"{"a":{"b":1,"b":1}}"#, false),
            (r#"{"a":[{"b":1,"b":2}]}"#, false),
            (r#"[1,2]"#, false),
            (r#"{"a":1} x"#, false),
            (r#"{"a":"\ud800"}"#, false),
        ];
        for (input, ok) in cases {
            assert_eq!(parse_object(input.as_bytes()).is_ok(), *ok, "{input}");
        }
    }
}
