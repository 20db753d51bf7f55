//! Finishing touches on the generated OpenAPI document, applied after every
//! route is registered (utoipa's `Modify` on the base document runs before
//! `utoipa_axum` adds the paths, so it cannot do this).
//!
//! * Problem bodies are declared `application/problem+json`, as served.
//! * The errors any route can produce without its handler saying so are
//!   declared on every operation: 400 (bad path or query), 401 (token),
//!   429 (rate limit), 500, 503 (database unavailable); and for operations
//!   with a body 413, 415, 422. A strict API tester (schemathesis) then
//!   finds no undocumented status.

use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Response};

use super::problem::PROBLEM_JSON;

fn is_problem(content: &Content) -> bool {
    matches!(&content.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"))
}

fn problem_response(description: &str) -> RefOr<Response> {
    let mut response = Response::new(description);
    let content = Content::new(Some(Ref::from_schema_name("Problem")));
    response.content = [(PROBLEM_JSON.to_owned(), content)].into_iter().collect();
    RefOr::T(response)
}

fn finish_operation(op: &mut Operation, public: bool) {
    for response in op.responses.responses.values_mut() {
        if let RefOr::T(response) = response
            && let Some(content) = response.content.get("application/json")
            && is_problem(content)
        {
            let content = response.content.shift_remove("application/json").expect("just seen");
            response.content.insert(PROBLEM_JSON.to_owned(), content);
        }
    }
    let mut standard = vec![("500", "Internal error; the request id finds it in the log")];
    if !public {
        standard.extend([
            ("400", "Malformed path, query or header"),
            ("401", "Missing, invalid, expired or revoked token"),
            ("429", "Rate limited; see Retry-After"),
            ("503", "Database unavailable; see Retry-After"),
        ]);
    }
    if op.request_body.is_some() {
        standard.extend([
            ("413", "Body too large"),
            ("415", "Body is not application/json"),
            ("422", "Body does not match the schema or breaks a rule"),
        ]);
    }
    for (code, description) in standard {
        op.responses.responses.entry(code.to_owned()).or_insert_with(|| problem_response(description));
    }
}

/// Applies the touches above to every operation.
pub fn finish(mut api: OpenApi) -> OpenApi {
    for (path, item) in api.paths.paths.iter_mut() {
        let public = path == "/v1/openapi.json";
        for op in
            [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete].into_iter().flatten()
        {
            finish_operation(op, public);
        }
    }
    api
}

/// A string map whose keys and values match these patterns (what
/// `validate` enforces, told to clients and API testers).
fn string_map(key_pattern: &str, value_pattern: &str, max_value_len: Option<usize>, max: usize) -> Object {
    let values = ObjectBuilder::new().schema_type(Type::String).max_length(max_value_len).pattern(Some(value_pattern));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(key_pattern))))
        .additional_properties(Some(values))
        .max_properties(Some(max))
        .build()
}

/// Labels and placement constraints (see `validate::labels`).
pub fn labels_schema() -> Object {
    string_map("^[A-Za-z0-9._/-]{1,63}$", "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", Some(255), 64)
}

/// Guest environment variables (see `validate::env`).
pub fn env_schema() -> Object {
    string_map("^[A-Za-z_][A-Za-z0-9_]{0,254}$", "^[^\\u0000]*$", None, 256)
}
