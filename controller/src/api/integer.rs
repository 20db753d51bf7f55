//! Integer fields that accept what JSON calls an integer.
//!
//! JSON has one number type, and JSON Schema (which our OpenAPI document
//! uses) defines `integer` as any number whose fractional part is zero, so
//! `64.0` is a valid `"type": "integer"`. Clients do send it: Python's
//! `json` writes floats that way, and a JavaScript value that went through
//! arithmetic may be one. serde's integer types refuse it, which would make
//! the document promise more than the server takes. Rather than a vendor
//! note in the document ("integers without a fraction, please"), the body's
//! integer fields go through these helpers: an integral number in range is
//! taken, `64.5` or `1e300` is still refused (422): be liberal in what is
//! the same number, strict in everything else.
//! Serialisation is unchanged (always `64`), so an idempotent create sent
//! once with `64` and once with `64.0` is the same request.

use serde::de::{Deserialize, Deserializer, Error};
use serde_json::Number;

fn convert<T, E>(n: &Number) -> Result<T, E>
where
    T: TryFrom<i64> + TryFrom<u64>,
    E: Error,
{
    let out_of_range = || E::custom(format!("invalid value: {n}, expected an integer in range"));
    if let Some(i) = n.as_i64() {
        return T::try_from(i).map_err(|_| out_of_range());
    }
    if let Some(u) = n.as_u64() {
        return T::try_from(u).map_err(|_| out_of_range());
    }
    // -2^63 and 2^63 are exact in f64; between them every integral f64
    // converts to i64 without loss.
    let limit = -(i64::MIN as f64);
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && (-limit..limit).contains(&f) => {
            T::try_from(f as i64).map_err(|_| out_of_range())
        }
        _ => Err(E::custom(format!("invalid value: {n}, expected an integer"))),
    }
}

/// `#[serde(deserialize_with = "integer::exact")]` on an integer field.
pub fn exact<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    convert(&Number::deserialize(deserializer)?)
}

/// The same for an `Option` field (`null` is `None`; pair it with
/// `#[serde(default)]` so that absent is `None` too).
pub fn optional<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    Option::<Number>::deserialize(deserializer)?.as_ref().map(convert).transpose()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sizes {
        #[serde(deserialize_with = "super::exact")]
        cpus: i32,
        #[serde(default, deserialize_with = "super::optional")]
        ttl: Option<u64>,
    }

    fn parse(json: &str) -> Result<Sizes, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn integral_numbers_in_range() {
        let s = parse(r#"{"cpus": 2.0, "ttl": 30.0}"#).unwrap();
        assert_eq!((s.cpus, s.ttl), (2, Some(30)));
        let s = parse(r#"{"cpus": -3, "ttl": null}"#).unwrap();
        assert_eq!((s.cpus, s.ttl), (-3, None));
        assert_eq!(parse(r#"{"cpus": 1e2}"#).unwrap().cpus, 100);
        assert_eq!(parse(r#"{"cpus": 1}"#).unwrap().ttl, None);
    }

    #[test]
    fn fractions_and_out_of_range_are_refused() {
        for bad in [
            r#"{"cpus": 2.5}"#,
            r#"{"cpus": 1e300}"#,
            r#"{"cpus": 2147483648}"#,
            r#"{"cpus": "2"}"#,
            r#"{"cpus": 1, "ttl": -1}"#,
            r#"{"cpus": 1, "ttl": -1.0}"#,
            r#"{"cpus": 1, "ttl": 0.5}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
