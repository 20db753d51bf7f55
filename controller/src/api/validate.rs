//! Input rules shared by the handlers. Checked before any database work so
//! a bad request costs nothing and changes nothing.

use std::collections::BTreeMap;

use super::problem::ApiError;

/// DNS-label style names (namespaces, machines, hosts): they end up in
/// URLs, logs and host-side paths.
pub fn name(what: &str, value: &str) -> Result<(), ApiError> {
    // The rule mmctl checks what it is sent against, too.
    if mm_protocols::spec_rules::is_dns_label(value) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} {value:?} must be 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
        )))
    }
}

/// Free text that ends up in Postgres TEXT columns and logs: no control
/// characters (Postgres cannot store NUL at all), `min` to `max`
/// characters (as JSON Schema counts them).
pub fn text(what: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let length = value.chars().count();
    if length < min || length > max || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!("{what} must be {min} to {max} characters without control characters")));
    }
    Ok(())
}

/// Whether `value` could be a name `name` accepts (for path parameters: a
/// name that cannot exist is simply not found).
pub fn is_name(value: &str) -> bool {
    name("", value).is_ok()
}

/// Whether `value` could be a snapshot id: the broker's ids are 12 hex
/// digits; this is looser (1 to 64 letters, digits, '-' or '_') so a
/// broker that makes longer ones needs no new controller, and still keeps
/// ids plain in URLs and logs.
pub fn is_snapshot_id(value: &str) -> bool {
    (1..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Label maps (machine labels, host labels, placement constraints).
pub fn labels(what: &str, map: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if map.len() > 64 {
        return Err(ApiError::invalid(format!("{what}: at most 64 labels")));
    }
    for (key, value) in map {
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(ApiError::invalid(format!(
                "{what}: label key {key:?} must be 1 to 63 letters, digits, '-', '_', '.' or '/'"
            )));
        }
        if value.len() > 255 || value.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "{what}: label {key:?} has a value longer than 255 bytes or with control characters"
            )));
        }
    }
    Ok(())
}

/// Environment variables for the guest.
pub fn env(map: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if map.len() > 256 {
        return Err(ApiError::invalid("config.env: at most 256 variables"));
    }
    for (key, value) in map {
        if value.contains('\0') {
            return Err(ApiError::invalid(format!("config.env: {key:?} has a NUL byte in its value")));
        }
        let ok = !key.is_empty()
            && key.len() <= 255
            && !key.as_bytes()[0].is_ascii_digit()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(ApiError::invalid(format!("config.env: {key:?} is not a valid variable name")));
        }
    }
    Ok(())
}

/// A label filter `key=value`.
pub fn label_filter(raw: &str) -> Result<(String, String), ApiError> {
    raw.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| ApiError::bad_request(format!("label filter {raw:?} is not key=value")))
}

/// An argv: at most 256 arguments of at most 4096 characters (as JSON
/// Schema's `maxLength` counts them, so the document can say it; 16 KiB of
/// UTF-8 at most, far below the kernel's 128 KiB per argument), no NUL
/// (which neither Postgres nor execve can carry).
pub fn command(what: &str, argv: &[String]) -> Result<(), ApiError> {
    if argv.len() > 256 {
        return Err(ApiError::invalid(format!("{what} has more than 256 arguments")));
    }
    if argv.iter().any(|a| a.chars().count() > 4096 || a.contains('\0')) {
        return Err(ApiError::invalid(format!("{what}: arguments are at most 4096 characters, without NUL")));
    }
    Ok(())
}

/// authorized_keys lines: at most 64, each 1 to 8192 characters on one
/// line (no control characters). Their syntax is the guest's to judge: a
/// line it cannot read is reported on its console and skipped.
pub fn ssh_keys(keys: &[String]) -> Result<(), ApiError> {
    if keys.len() > 64 {
        return Err(ApiError::invalid("config.ssh_keys has more than 64 keys"));
    }
    let bad = |k: &String| k.is_empty() || k.chars().count() > 8192 || k.chars().any(char::is_control);
    if keys.iter().any(bad) {
        return Err(ApiError::invalid("config.ssh_keys: each key is 1 to 8192 characters on one line"));
    }
    Ok(())
}

/// A machine's command, env and SSH keys together: the broker puts them on
/// the guest's kernel command line, which has room for
/// `mm_protocols::spec_rules::WORKLOAD_CMDLINE_MAX` bytes of them; more
/// would be accepted here and fail at boot.
pub fn workload(command: &[String], env: &BTreeMap<String, String>, ssh_keys: &[String]) -> Result<(), ApiError> {
    let env = env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    mm_protocols::spec_rules::check_workload(command, env, ssh_keys)
        .map(drop)
        .map_err(|e| ApiError::invalid(format!("config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("n", "prod-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", &"x".repeat(64)] {
            assert!(name("n", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn snapshot_ids() {
        assert!(is_snapshot_id("0123456789ab") && is_snapshot_id("A_b-1"));
        for bad in ["", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!is_snapshot_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn label_maps() {
        let ok: BTreeMap<_, _> = [("region".to_string(), "fra".to_string())].into();
        assert!(labels("l", &ok).is_ok());
        let bad: BTreeMap<_, _> = [("a b".to_string(), String::new())].into();
        assert!(labels("l", &bad).is_err());
    }

    #[test]
    fn env_names() {
        let ok: BTreeMap<_, _> = [("PATH_2".to_string(), "x".to_string())].into();
        assert!(env(&ok).is_ok());
        let bad: BTreeMap<_, _> = [("2X".to_string(), "x".to_string())].into();
        assert!(env(&bad).is_err());
    }

    #[test]
    fn workloads_must_fit_the_kernel_command_line() {
        let small: BTreeMap<_, _> = [("A".to_string(), "x".repeat(900))].into();
        assert!(workload(&[], &small, &[]).is_ok());
        let big: BTreeMap<_, _> = [("A".to_string(), "x".repeat(70 * 1024))].into();
        assert!(workload(&[], &big, &[]).is_err());
        assert!(workload(&["y".repeat(600)], &small, &[]).is_err(), "the sum counts");
    }

    #[test]
    fn label_filters() {
        assert_eq!(label_filter("a=b=c").unwrap(), ("a".to_string(), "b=c".to_string()));
        assert!(label_filter("=x").is_err());
        assert!(label_filter("novalue").is_err());
    }
}
