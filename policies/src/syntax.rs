//! The policy file language, shared by build.rs (which compiles it) and the
//! crate's tests. Kept deliberately small so a reviewer reads a policy like a
//! list, in the spirit of crosvm's `.policy` files:
//!
//! ```text
//! # Why the next group is needed (one comment per group).
//! read
//! ioctl: arg1 == KVM_RUN
//! mmap: arg2 & PROT_EXEC == 0
//! socket: arg0 == AF_UNIX && arg1 & 0xf == SOCK_STREAM
//! @include common.policy
//! @define KVM_RUN 0xae80
//! ```
//!
//! A bare name allows the syscall with any arguments. `name: CONDITIONS`
//! allows it when every `&&`-joined condition holds; several such lines for
//! one syscall are alternatives. A bare name after conditional lines (e.g.
//! from an include) widens them to "any arguments"; conditions after a bare
//! name are an error, since they would restrict nothing. Values are numbers or `@define`d names;
//! comparisons of values that fit in 32 bits look at the low 32 bits of the
//! argument (the kernel truncates `int` arguments the same way), larger ones
//! at all 64.

use std::collections::BTreeMap;

/// `==`, `!=`, `<`, `<=`, `>`, `>=`, or `& MASK ==`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    MaskedEq(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub arg: u8,
    pub op: Op,
    pub value: u64,
}

/// What one policy allows: per syscall name, either everything (`None`) or
/// a list of alternatives, each a conjunction of conditions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rules: BTreeMap<String, Option<Vec<Vec<Condition>>>>,
}

impl Policy {
    /// Number of distinct syscalls the policy allows at all.
    pub fn syscall_count(&self) -> usize {
        self.rules.len()
    }
}

/// Reads an included file by name.
pub trait Loader {
    fn load(&self, name: &str) -> Result<String, String>;
}

struct Parser<'a> {
    loader: &'a dyn Loader,
    defines: BTreeMap<String, u64>,
    policy: Policy,
    depth: usize,
}

/// Parses policy `name` (and everything it includes).
pub fn parse(name: &str, loader: &dyn Loader) -> Result<Policy, String> {
    let mut parser = Parser { loader, defines: BTreeMap::new(), policy: Policy::default(), depth: 0 };
    parser.file(name)?;
    Ok(parser.policy)
}

impl Parser<'_> {
    fn file(&mut self, name: &str) -> Result<(), String> {
        self.depth += 1;
        if self.depth > 8 {
            return Err(format!("{name}: includes nested too deeply"));
        }
        let text = self.loader.load(name)?;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            self.line(line).map_err(|e| format!("{name}:{}: {e}: {raw:?}", i + 1))?;
        }
        self.depth -= 1;
        Ok(())
    }

    fn line(&mut self, line: &str) -> Result<(), String> {
        if let Some(rest) = line.strip_prefix("@include ") {
            return self.file(rest.trim());
        }
        if let Some(rest) = line.strip_prefix("@define ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
                return Err("expected `@define NAME VALUE`".into());
            };
            let value = self.value(value)?;
            if self.defines.insert(name.to_string(), value).is_some_and(|old| old != value) {
                return Err(format!("{name} defined twice with different values"));
            }
            return Ok(());
        }
        let (name, conditions) = match line.split_once(':') {
            Some((name, rest)) => (name.trim(), Some(self.conditions(rest)?)),
            None => (line, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad syscall name {name:?}"));
        }
        let entry = self.policy.rules.entry(name.to_string());
        match (entry, conditions) {
            (std::collections::btree_map::Entry::Vacant(v), c) => {
                v.insert(c.map(|c| vec![c]));
            }
            (std::collections::btree_map::Entry::Occupied(mut o), Some(c)) => match o.get_mut() {
                Some(alternatives) => alternatives.push(c),
                None => return Err(format!("{name} is already allowed unconditionally")),
            },
            (std::collections::btree_map::Entry::Occupied(mut o), None) => {
                // A policy may widen what an include allows with conditions
                // (the same unconditional line twice is harmless too).
                o.insert(None);
            }
        }
        Ok(())
    }

    fn conditions(&self, text: &str) -> Result<Vec<Condition>, String> {
        text.split("&&").map(|c| self.condition(c.trim())).collect()
    }

    /// `argN OP VALUE` or `argN & MASK == VALUE`.
    fn condition(&self, text: &str) -> Result<Condition, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let arg = words
            .first()
            .and_then(|w| w.strip_prefix("arg"))
            .and_then(|n| n.parse::<u8>().ok())
            .filter(|n| *n < 6)
            .ok_or_else(|| format!("condition {text:?} must start with arg0..arg5"))?;
        let (op, value) = match words.as_slice() {
            [_, "&", mask, "==", value] => (Op::MaskedEq(self.value(mask)?), *value),
            [_, op, value] => {
                let op = match *op {
                    "==" => Op::Eq,
                    "!=" => Op::Ne,
                    "<" => Op::Lt,
                    "<=" => Op::Le,
                    ">" => Op::Gt,
                    ">=" => Op::Ge,
                    other => return Err(format!("unknown operator {other:?}")),
                };
                (op, *value)
            }
            _ => return Err(format!("cannot read condition {text:?}")),
        };
        Ok(Condition { arg, op, value: self.value(value)? })
    }

    /// A number (decimal, 0x hex, 0o octal), a defined name, or `A|B|...`.
    fn value(&self, text: &str) -> Result<u64, String> {
        text.split('|').try_fold(0u64, |acc, part| {
            let part = part.trim();
            let v = if let Some(hex) = part.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).map_err(|e| format!("{part}: {e}"))?
            } else if let Some(oct) = part.strip_prefix("0o") {
                u64::from_str_radix(oct, 8).map_err(|e| format!("{part}: {e}"))?
            } else if part.starts_with(|c: char| c.is_ascii_digit()) {
                part.parse::<u64>().map_err(|e| format!("{part}: {e}"))?
            } else {
                *self.defines.get(part).ok_or_else(|| format!("{part} is not defined"))?
            };
            Ok(acc | v)
        })
    }
}
