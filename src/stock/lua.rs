//! The Lua scripts of `lua/`: embedded in the binary, or read from
//! `SECKILL_LUA_DIR` so ops can try a changed script without a rebuild.
//!
//! The set is fixed once per process, before the first script runs. At
//! start-up every script is loaded into Redis with `SCRIPT LOAD` and its SHA
//! logged; a script Redis refuses stops the start-up with Redis's error.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use redis::Script;
use redis::aio::ConnectionManager;

/// Every script, by the name of its file in `lua/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Purchase,
    Preheat,
    Restock,
    Recover,
    IssueToken,
}

const EMBEDDED: [(Name, &str, &str); 5] = [
    (
        Name::Purchase,
        "purchase.lua",
        include_str!("../../lua/purchase.lua"),
    ),
    (
        Name::Preheat,
        "preheat.lua",
        include_str!("../../lua/preheat.lua"),
    ),
    (
        Name::Restock,
        "restock.lua",
        include_str!("../../lua/restock.lua"),
    ),
    (
        Name::Recover,
        "recover.lua",
        include_str!("../../lua/recover.lua"),
    ),
    (
        Name::IssueToken,
        "issue_token.lua",
        include_str!("../../lua/issue_token.lua"),
    ),
];

/// One script: its file name, source and the invocable [`Script`].
pub struct Lua {
    pub name: &'static str,
    pub source: String,
    pub script: Script,
    /// Where the source came from: `embedded` or the file's path.
    pub origin: String,
}

impl Lua {
    /// The contract header: the leading `--[[ … ]]` comment.
    pub fn contract(&self) -> &str {
        let s = self.source.trim_start();
        match (s.strip_prefix("--[["), s.find("]]")) {
            (Some(_), Some(end)) => s[4..end].trim(),
            _ => "",
        }
    }
}

static SCRIPTS: OnceLock<Vec<Lua>> = OnceLock::new();

fn embedded() -> Vec<Lua> {
    EMBEDDED
        .iter()
        .map(|(_, name, source)| Lua {
            name,
            source: (*source).to_string(),
            script: Script::new(source),
            origin: "embedded".into(),
        })
        .collect()
}

/// All scripts, in the order of [`Name`].
pub fn all() -> &'static [Lua] {
    SCRIPTS.get_or_init(embedded)
}

/// The script `name`.
pub fn script(name: Name) -> &'static Script {
    let index = EMBEDDED
        .iter()
        .position(|(n, _, _)| *n == name)
        .expect("every name has a script");
    &all()[index].script
}

/// Reads every script from `dir` instead of the embedded copies. Must run
/// before any script is used; a missing or unreadable file is an error.
pub fn use_dir(dir: &Path) -> anyhow::Result<()> {
    let mut scripts = Vec::new();
    for (_, name, _) in EMBEDDED {
        let path = dir.join(name);
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        scripts.push(Lua {
            name,
            script: Script::new(&source),
            source,
            origin: path.display().to_string(),
        });
    }
    if SCRIPTS.set(scripts).is_err() {
        bail!("the Lua scripts were already chosen before SECKILL_LUA_DIR was applied");
    }
    Ok(())
}

/// Loads every script into Redis (`SCRIPT LOAD`) and logs its SHA. A
/// script Redis refuses (a syntax error, say) is an error naming it.
pub async fn load_all(conn: &mut ConnectionManager) -> anyhow::Result<()> {
    for lua in all() {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(&lua.source)
            .query_async(conn)
            .await
            .with_context(|| format!("redis refused lua script {} ({})", lua.name, lua.origin))?;
        if sha != lua.script.get_hash() {
            bail!("redis computed another SHA for {}: {sha}", lua.name);
        }
        tracing::info!(script = lua.name, sha = %sha, origin = %lua.origin, "lua script loaded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_states_its_contract() {
        for lua in all() {
            let contract = lua.contract();
            for word in ["KEYS[1]", "ARGV[1]", "Returns", "Invariants"] {
                assert!(
                    contract.contains(word),
                    "{} lacks {word} in its header",
                    lua.name
                );
            }
        }
    }
}
