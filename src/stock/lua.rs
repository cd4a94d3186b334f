//! The Lua scripts of `lua/`: embedded in the binary, or read from
//! `SECKILL_LUA_DIR` so ops can try a changed script without a rebuild.
//!
//! The set is fixed once per process, before the first script runs. At
//! start-up the store loads every script into Redis (`SCRIPT LOAD`) and logs
//! its SHA; a script Redis refuses stops the start-up with Redis's error.
//! [`codes`] names the values each script returns, as its header lists them.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use redis::Script;

/// Every script, by the name of its file in `lua/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Purchase,
    Preheat,
    Restock,
    Recover,
    Refill,
    IssueToken,
    TransferOut,
    TransferIn,
    TransferDone,
    ReleaseLock,
}

const EMBEDDED: [(Name, &str, &str); 10] = [
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
        Name::Refill,
        "refill.lua",
        include_str!("../../lua/refill.lua"),
    ),
    (
        Name::IssueToken,
        "issue_token.lua",
        include_str!("../../lua/issue_token.lua"),
    ),
    (
        Name::TransferOut,
        "transfer_out.lua",
        include_str!("../../lua/transfer_out.lua"),
    ),
    (
        Name::TransferIn,
        "transfer_in.lua",
        include_str!("../../lua/transfer_in.lua"),
    ),
    (
        Name::TransferDone,
        "transfer_done.lua",
        include_str!("../../lua/transfer_done.lua"),
    ),
    (
        Name::ReleaseLock,
        "release_lock.lua",
        include_str!("../../lua/release_lock.lua"),
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

/// The return codes of the scripts, named as their headers list them. A
/// code not listed here is an error where it is read, never a default.
pub mod codes {
    /// `purchase.lua`: one per buyer.
    pub mod purchase {
        pub const SOLD_OUT: i64 = 0;
        pub const BOUGHT: i64 = 1;
        pub const ALREADY_PURCHASED: i64 = 2;
        pub const NOT_STARTED: i64 = 3;
        pub const ENDED: i64 = 4;
        pub const UNKNOWN: i64 = 5;
    }

    /// `issue_token.lua`.
    pub mod issue_token {
        pub const REFUSED: i64 = 0;
        pub const ADMITTED: i64 = 1;
        pub const ADMITTED_BEFORE: i64 = 2;
        pub const NOT_STARTED: i64 = 3;
        pub const ENDED: i64 = 4;
        pub const UNKNOWN: i64 = 5;
    }

    /// `restock.lua`.
    pub mod restock {
        pub const ALREADY_RETURNED: i64 = 0;
        pub const RETURNED: i64 = 1;
        pub const NO_STATE: i64 = -1;
    }

    /// `recover.lua`.
    pub mod recover {
        pub const STATE_EXISTED: i64 = 0;
        pub const REBUILT: i64 = 1;
        pub const LOCK_LOST: i64 = 2;
    }

    /// `refill.lua`.
    pub mod refill {
        pub const WRITTEN: i64 = 1;
        pub const REFUSED: i64 = 2;
    }
    /// `transfer_out.lua`: a positive count is the units taken.
    pub mod transfer_out {
        pub const EMPTY: i64 = 0;
        pub const NO_STATE: i64 = -1;
    }
    /// `transfer_in.lua`.
    pub mod transfer_in {
        pub const ALREADY_RECEIVED: i64 = 0;
        pub const ADDED: i64 = 1;
        pub const NO_STATE: i64 = -1;
    }
    /// `transfer_done.lua`.
    pub mod transfer_done {
        pub const ALREADY_DONE: i64 = 0;
        pub const DONE: i64 = 1;
        pub const NO_RECORD: i64 = -1;
    }
    /// `release_lock.lua`.
    pub mod release_lock {
        pub const NOT_HELD: i64 = 0;
        pub const RELEASED: i64 = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each code of [`codes`] appears in its script's `Returns` section, so
    /// the Rust names and the Lua header cannot drift apart silently.
    #[test]
    fn every_named_code_is_in_its_script_header() {
        let table: [(&str, &[i64]); 9] = [
            (
                "purchase.lua",
                &[
                    codes::purchase::SOLD_OUT,
                    codes::purchase::BOUGHT,
                    codes::purchase::ALREADY_PURCHASED,
                    codes::purchase::NOT_STARTED,
                    codes::purchase::ENDED,
                    codes::purchase::UNKNOWN,
                ],
            ),
            (
                "issue_token.lua",
                &[
                    codes::issue_token::REFUSED,
                    codes::issue_token::ADMITTED,
                    codes::issue_token::ADMITTED_BEFORE,
                    codes::issue_token::NOT_STARTED,
                    codes::issue_token::ENDED,
                    codes::issue_token::UNKNOWN,
                ],
            ),
            (
                "restock.lua",
                &[
                    codes::restock::ALREADY_RETURNED,
                    codes::restock::RETURNED,
                    codes::restock::NO_STATE,
                ],
            ),
            (
                "recover.lua",
                &[
                    codes::recover::STATE_EXISTED,
                    codes::recover::REBUILT,
                    codes::recover::LOCK_LOST,
                ],
            ),
            (
                "refill.lua",
                &[codes::refill::WRITTEN, codes::refill::REFUSED],
            ),
            (
                "transfer_out.lua",
                &[codes::transfer_out::EMPTY, codes::transfer_out::NO_STATE],
            ),
            (
                "transfer_in.lua",
                &[
                    codes::transfer_in::ALREADY_RECEIVED,
                    codes::transfer_in::ADDED,
                    codes::transfer_in::NO_STATE,
                ],
            ),
            (
                "transfer_done.lua",
                &[
                    codes::transfer_done::ALREADY_DONE,
                    codes::transfer_done::DONE,
                    codes::transfer_done::NO_RECORD,
                ],
            ),
            (
                "release_lock.lua",
                &[codes::release_lock::NOT_HELD, codes::release_lock::RELEASED],
            ),
        ];
        for (name, codes) in table {
            let lua = all().iter().find(|l| l.name == name).unwrap();
            let contract = lua.contract();
            let returns = &contract[contract.find("Returns").unwrap()..];
            for code in codes {
                let listed = returns
                    .split(|c: char| !(c.is_ascii_digit() || c == '-'))
                    .any(|word| word == code.to_string());
                assert!(listed, "{name}: code {code} is not in its Returns section");
            }
        }
    }

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
