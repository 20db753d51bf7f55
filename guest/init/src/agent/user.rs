//! Resolving an exec's `user` (`name`, `uid`, optionally `:group`/`:gid`)
//! against the guest's `/etc/passwd` and `/etc/group`, as `docker exec -u`
//! does. Numeric ids work without either file, since images may have none.

/// The ids a child switches to, and the home it gets as `HOME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    pub home: String,
    pub name: Option<String>,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        match f.as_slice() {
            [name, _, uid, gid, _, home, ..] => {
                Some(PasswdEntry { name, uid: uid.parse().ok()?, gid: gid.parse().ok()?, home })
            }
            _ => None,
        }
    })
}

/// `(name, gid, members)` of each `/etc/group` line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        match f.as_slice() {
            [name, _, gid, members, ..] => {
                Some((*name, gid.parse().ok()?, members.split(',').filter(|m| !m.is_empty()).collect()))
            }
            [name, _, gid] => Some((*name, gid.parse().ok()?, Vec::new())),
            _ => None,
        }
    })
}

/// Resolves `spec` with the contents of `/etc/passwd` and `/etc/group`
/// (empty when missing). The error is the message for the host.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let (uid, entry) = if let Ok(uid) = user.parse::<u32>() {
        (uid, passwd_entries(passwd).find(|e| e.uid == uid))
    } else {
        let entry = passwd_entries(passwd).find(|e| e.name == user).ok_or_else(|| format!("no such user: {user}"))?;
        (entry.uid, Some(entry))
    };
    let gid = match group_spec {
        None => entry.as_ref().map_or(0, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| format!("no such group: {g}"))?,
        },
    };
    let name = entry.as_ref().map(|e| e.name.to_string());
    let mut groups = vec![gid];
    // An explicit group replaces the user's groups, as with `docker exec -u`.
    if group_spec.is_none()
        && let Some(name) = &name
    {
        for (_, g, members) in group_entries(group) {
            if members.contains(&name.as_str()) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    let home = entry.as_ref().map_or("/", |e| e.home).to_string();
    Ok(Identity { uid, gid, groups, home, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:100:Alice:/home/alice:/bin/sh\nbad line\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:\nwheel:x:10:alice,bob\ndocker:x:999:bob,alice\n";

    #[test]
    fn by_name_with_supplementary_groups() {
        let id = resolve("alice", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.groups), (1000, 100, vec![100, 10, 999]));
        assert_eq!(id.home, "/home/alice");
        assert_eq!(id.name.as_deref(), Some("alice"));
    }

    #[test]
    fn numeric_ids_work_without_files() {
        let id = resolve("1234:55", "", "").unwrap();
        assert_eq!((id.uid, id.gid, id.groups, id.home.as_str(), id.name), (1234, 55, vec![55], "/", None));
        let id = resolve("1000", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 100));
        assert_eq!(resolve("4321", "", "").unwrap().gid, 0);
    }

    #[test]
    fn group_by_name_and_errors() {
        let id = resolve("alice:wheel", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.groups), (1000, 10, vec![10]));
        assert_eq!(resolve("mallory", PASSWD, GROUP).unwrap_err(), "no such user: mallory");
        assert_eq!(resolve("alice:nogroup", PASSWD, GROUP).unwrap_err(), "no such group: nogroup");
    }
}
