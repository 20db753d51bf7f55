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
//! * Each create answers with OpenAPI links to the operations that take
//!   what it made (`links`), so clients and a stateful tester can follow
//!   them instead of guessing names.
//! * A token must name a role or be a cluster admin (`CreateToken`'s
//!   `anyOf`), and a machine needs a `config` or a `from_snapshot`
//!   (`CreateMachine`'s), which the derive cannot say.

use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, Array, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, Type,
};
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

/// What each create's success answer supplies: the operation, and path
/// parameter → runtime expression into its body.
const LINK_SOURCES: &[(&str, &[(&str, &str)])] = &[
    ("namespaces_create", &[("namespace", "$response.body#/name")]),
    (
        "machines_create",
        &[("namespace", "$response.body#/namespace"), ("id", "$response.body#/id"), ("name", "$response.body#/host")],
    ),
    (
        "machines_branch",
        &[("namespace", "$response.body#/namespace"), ("id", "$response.body#/id"), ("name", "$response.body#/host")],
    ),
    (
        "snapshots_fork",
        &[
            ("namespace", "$response.body#/machines/0/namespace"),
            ("id", "$response.body#/machines/0/id"),
            ("name", "$response.body#/machines/0/host"),
        ],
    ),
    ("hosts_register", &[("name", "$response.body#/name")]),
    (
        "snapshots_create",
        &[
            ("namespace", "$response.body#/namespace"),
            ("sid", "$response.body#/id"),
            ("id", "$response.body#/machine_id"),
        ],
    ),
];

fn operations(api: &mut OpenApi) -> impl Iterator<Item = (&String, &mut Operation)> {
    api.paths.paths.iter_mut().flat_map(|(path, item)| {
        [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete]
            .into_iter()
            .flatten()
            .map(move |op| (path, op))
    })
}

/// The names in a path template: `/v1/hosts/{name}` → `["name"]`.
fn path_parameters(path: &str) -> Vec<&str> {
    path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')).collect()
}

/// Links every success answer of a `LINK_SOURCES` operation to each
/// operation whose path parameters that answer supplies, all of them.
fn add_links(api: &mut OpenApi) {
    let mut targets = Vec::new();
    for (path, op) in operations(api) {
        let params = path_parameters(path).into_iter().map(str::to_owned).collect::<Vec<_>>();
        if let (false, Some(id)) = (params.is_empty(), &op.operation_id) {
            targets.push((id.clone(), params));
        }
    }
    for (_, op) in operations(api) {
        let Some(&(_, supplies)) = LINK_SOURCES.iter().find(|(id, _)| op.operation_id.as_deref() == Some(*id)) else {
            continue;
        };
        for (status, response) in op.responses.responses.iter_mut() {
            let RefOr::T(response) = response else { continue };
            if !status.starts_with('2') {
                continue;
            }
            for (target, params) in &targets {
                let found: Option<Vec<_>> =
                    params.iter().map(|p| supplies.iter().find(|(name, _)| name == p).copied()).collect();
                let Some(found) = found else { continue };
                // utoipa 5.5 serialises `Link::operation_id` as
                // "operation_id"; OpenAPI (and every tool) reads
                // "operationId". Its flattened extensions map writes any
                // key as given, so the name goes in there.
                let name = Extensions::from_iter([("operationId", target.clone())]);
                let mut link = LinkBuilder::new().extensions(Some(name));
                for (name, expression) in found {
                    link = link.parameter(name, expression);
                }
                response.links.insert(target.clone(), RefOr::T(link.build()));
            }
        }
    }
}

/// `CreateToken` as served, plus: at least one role, or `cluster_admin`
/// true (else 422).
fn token_needs_a_grant(api: &mut OpenApi) {
    let Some(schemas) = api.components.as_mut().map(|c| &mut c.schemas) else { return };
    let Some(original) = schemas.remove("CreateToken") else { return };
    let admin = ObjectBuilder::new()
        .property("cluster_admin", ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([true])))
        .required("cluster_admin");
    let some_role = ObjectBuilder::new()
        .property("roles", ObjectBuilder::new().schema_type(Type::Object).min_properties(Some(1)))
        .required("roles");
    let grant = AnyOfBuilder::new().item(admin).item(some_role);
    let schema = AllOfBuilder::new()
        .item(original)
        .item(grant)
        .description(Some("A token must grant something: at least one namespace role, or cluster_admin true."));
    schemas.insert("CreateToken".to_owned(), RefOr::T(Schema::AllOf(schema.build())));
}

/// `CreateMachine` as served, plus: `config` or `from_snapshot` (else
/// 422). Said as "a config and no snapshot, or a snapshot" (`oneOf`) rather
/// than "either" (`anyOf`, the same set of bodies): a generator that fills
/// in every property then still makes bodies without a snapshot, which are
/// the ones that can succeed without one existing.
fn machine_needs_a_source(api: &mut OpenApi) {
    let Some(schemas) = api.components.as_mut().map(|c| &mut c.schemas) else { return };
    let Some(original) = schemas.remove("CreateMachine") else { return };
    // utoipa has no `not`; its extensions map writes any key as given.
    let no_snapshot = serde_json::json!({ "required": ["from_snapshot"] });
    let booted =
        ObjectBuilder::new().required("config").extensions(Some(Extensions::from_iter([("not", no_snapshot)])));
    let restored = ObjectBuilder::new().required("from_snapshot");
    let source = OneOfBuilder::new().item(booted).item(restored);
    let schema = AllOfBuilder::new().item(original).item(source).description(Some(
        "A machine runs its config, or resumes a snapshot (from_snapshot): one of them is required.",
    ));
    schemas.insert("CreateMachine".to_owned(), RefOr::T(Schema::AllOf(schema.build())));
}

/// Applies the touches above.
pub fn finish(mut api: OpenApi) -> OpenApi {
    for (path, op) in operations(&mut api) {
        finish_operation(op, path == "/v1/openapi.json");
    }
    add_links(&mut api);
    token_needs_a_grant(&mut api);
    machine_needs_a_source(&mut api);
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

/// What `validate::name` accepts: namespace, machine and host names.
pub const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// A token's roles: namespace name → role.
pub fn roles_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(ObjectBuilder::new().schema_type(Type::String).pattern(Some(NAME_PATTERN))))
        .additional_properties(Some(<crate::auth::Role as utoipa::PartialSchema>::schema()))
        .build()
}

/// An argv as `validate::command` takes it: at most 256 arguments of at
/// most 4096 characters, no NUL.
fn argv(min_items: usize) -> Array {
    let argument = ObjectBuilder::new().schema_type(Type::String).max_length(Some(4096)).pattern(Some("^[^\\u0000]*$"));
    ArrayBuilder::new().items(argument).min_items(Some(min_items)).max_items(Some(256)).build()
}

/// A machine's `config.command` (empty: the image's default).
pub fn command_schema() -> Array {
    argv(0)
}

/// An exec's `command` (a program is required).
pub fn exec_command_schema() -> Array {
    argv(1)
}

/// A machine's `config.ssh_keys` (see `validate::ssh_keys`).
pub fn ssh_keys_schema() -> Array {
    let key = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(8192))
        .pattern(Some("^[^\\u0000-\\u001F\\u007F-\\u009F]+$"));
    ArrayBuilder::new().items(key).max_items(Some(64)).build()
}

/// Labels and placement constraints (see `validate::labels`).
pub fn labels_schema() -> Object {
    string_map("^[A-Za-z0-9._/-]{1,63}$", "^[^\\u0000-\\u001F\\u007F-\\u009F]*$", Some(255), 64)
}

/// Guest environment variables (see `validate::env`).
pub fn env_schema() -> Object {
    string_map("^[A-Za-z_][A-Za-z0-9_]{0,254}$", "^[^\\u0000]*$", None, 256)
}
