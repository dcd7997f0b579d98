//! What each command does.

use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::SystemTime;

use tokenkeeper::{Cas, GrantRecord, TokenKey, TokenStore};

use crate::failure::Failure;
use crate::output::{self, ExportLine, Summary};
use crate::store_url::{Access, StoreUrl};
use crate::transfer::{self, Ends};
use crate::{Command, GrantsCommand, StoreArgs, TransferArgs};

/// Keys read from a store per page.
const PAGE: usize = 256;

pub async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Grants(GrantsCommand::List { store, json }) => list(&store, json).await,
        Command::Grants(GrantsCommand::Show {
            key,
            store,
            json,
            include_secrets,
        }) => show(&store, &key, json, include_secrets).await,
        Command::Grants(GrantsCommand::Delete { key, store }) => delete(&store, &key).await,
        Command::Grants(GrantsCommand::Export {
            store,
            include_secrets,
        }) => export(&store, include_secrets).await,
        Command::Grants(GrantsCommand::Import {
            store,
            input,
            force,
        }) => import(&store, input, force).await,
        Command::Grants(GrantsCommand::Move(args)) => transfer(&args, Mode::Move).await,
        Command::Grants(GrantsCommand::Copy(args)) => transfer(&args, Mode::Copy).await,
        Command::Rekey { store } => rekey(&store).await,
    }
}

async fn open(args: &StoreArgs, access: Access) -> Result<Arc<dyn TokenStore>, Failure> {
    StoreUrl::parse(&args.store)?
        .open(&args.keys()?, access)
        .await
}

/// Every key of `store`, a page at a time.
async fn all_keys(store: &dyn TokenStore) -> Result<Vec<TokenKey>, Failure> {
    let mut keys = Vec::new();
    loop {
        let page = store
            .keys_after(keys.last(), PAGE)
            .await
            .map_err(|e| Failure::store("cannot list the store's grants", e))?;
        let done = page.len() < PAGE;
        keys.extend(page);
        if done {
            return Ok(keys);
        }
    }
}

fn key_of(text: &str) -> Result<TokenKey, Failure> {
    if text.is_empty() {
        return Err(Failure::usage("a grant key cannot be empty"));
    }
    Ok(TokenKey::from(text))
}

fn print(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))
}

fn json_line(value: &impl serde::Serialize) -> Result<String, Failure> {
    serde_json::to_string(value)
        .map(|mut line| {
            line.push('\n');
            line
        })
        .map_err(|e| Failure::runtime(format!("cannot encode JSON: {e}")))
}

async fn list(args: &StoreArgs, json: bool) -> Result<(), Failure> {
    let store = open(args, Access::Read).await?;
    let now = SystemTime::now();
    let mut rows = Vec::new();
    let mut unreadable = 0;
    for key in all_keys(&*store).await? {
        match store.load(&key).await {
            Ok(Some(loaded)) => rows.push(Summary::of(&key, &loaded.value, now)),
            // Deleted since the listing.
            Ok(None) => {}
            Err(e) => {
                unreadable += 1;
                Failure::store(format!("cannot read `{key}`"), e).warn();
            }
        }
    }
    if json {
        let mut out = String::new();
        for row in &rows {
            out.push_str(&json_line(row)?);
        }
        print(&out)?;
    } else {
        print(&output::table(&rows))?;
    }
    if unreadable > 0 {
        return Err(Failure::runtime(format!(
            "{unreadable} grant(s) could not be read (listed above)"
        )));
    }
    Ok(())
}

async fn load(
    store: &dyn TokenStore,
    key: &TokenKey,
) -> Result<tokenkeeper::Versioned<GrantRecord>, Failure> {
    store
        .load(key)
        .await
        .map_err(|e| Failure::store(format!("cannot read `{key}`"), e))?
        .ok_or_else(|| Failure::not_found(format!("no grant `{key}`")))
}

async fn show(args: &StoreArgs, key: &str, json: bool, secrets: bool) -> Result<(), Failure> {
    let key = key_of(key)?;
    let store = open(args, Access::Read).await?;
    let loaded = load(&*store, &key).await?;
    if secrets {
        let line = ExportLine::of(&key, &loaded.value)
            .map_err(|e| Failure::runtime(format!("cannot encode `{key}`: {e}")))?;
        return print(&json_line(&line)?);
    }
    let summary = Summary::of(&key, &loaded.value, SystemTime::now());
    if json {
        print(&json_line(&summary)?)
    } else {
        print(&summary.lines())
    }
}

async fn delete(args: &StoreArgs, key: &str) -> Result<(), Failure> {
    let key = key_of(key)?;
    let store = open(args, Access::Read).await?;
    let deleted = store
        .delete(&key)
        .await
        .map_err(|e| Failure::store(format!("cannot delete `{key}`"), e))?;
    if !deleted {
        return Err(Failure::not_found(format!("no grant `{key}`")));
    }
    eprintln!("deleted `{key}`");
    Ok(())
}

async fn export(args: &StoreArgs, secrets: bool) -> Result<(), Failure> {
    let store = open(args, Access::Read).await?;
    let now = SystemTime::now();
    // All or nothing: an export missing a grant it could not read would look complete.
    let mut out = String::new();
    for key in all_keys(&*store).await? {
        let Some(loaded) = store
            .load(&key)
            .await
            .map_err(|e| Failure::store(format!("cannot read `{key}`; nothing exported"), e))?
        else {
            continue;
        };
        let line = if secrets {
            json_line(
                &ExportLine::of(&key, &loaded.value)
                    .map_err(|e| Failure::runtime(format!("cannot encode `{key}`: {e}")))?,
            )?
        } else {
            json_line(&Summary::of(&key, &loaded.value, now))?
        };
        out.push_str(&line);
    }
    print(&out)
}

/// Reads an `export --include-secrets` file: every line checked before anything is written.
fn read_export(input: Option<std::path::PathBuf>) -> Result<Vec<(TokenKey, GrantRecord)>, Failure> {
    let reader: Box<dyn BufRead> = match &input {
        Some(path) => Box::new(BufReader::new(std::fs::File::open(path).map_err(|e| {
            Failure::runtime(format!("cannot open `{}`: {e}", path.display()))
        })?)),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut grants = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let n = n + 1;
        let line = line.map_err(|e| Failure::runtime(format!("cannot read line {n}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        // Parsed without quoting the line back: it holds tokens.
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            Failure::runtime(format!(
                "line {n} is not JSON (at column {}); nothing imported",
                e.column()
            ))
        })?;
        let Some(key) = value.get("key").and_then(|k| k.as_str()) else {
            return Err(Failure::runtime(format!(
                "line {n} has no \"key\"; nothing imported"
            )));
        };
        let Some(record) = value.get("record") else {
            return Err(Failure::refused(format!(
                "line {n} (`{key}`) holds no tokens: the file was exported without \
                 --include-secrets and cannot be imported; nothing imported"
            )));
        };
        let bytes =
            serde_json::to_vec(record).map_err(|e| Failure::runtime(format!("line {n}: {e}")))?;
        let record = GrantRecord::from_json(&bytes)
            .map_err(|e| Failure::store(format!("line {n} (`{key}`); nothing imported"), e))?;
        grants.push((key_of(key)?, record));
    }
    Ok(grants)
}

async fn import(
    args: &StoreArgs,
    input: Option<std::path::PathBuf>,
    force: bool,
) -> Result<(), Failure> {
    let grants = read_export(input)?;
    let store = open(args, Access::Write).await?;
    let mut versions = Vec::with_capacity(grants.len());
    for (key, _) in &grants {
        let existing = store
            .load(key)
            .await
            .map_err(|e| Failure::store(format!("cannot read `{key}`; nothing imported"), e))?;
        match existing {
            Some(_) if !force => {
                return Err(Failure::refused(format!(
                    "the store already has `{key}`; --force overwrites it; nothing imported"
                )))
            }
            existing => versions.push(existing.map(|v| v.version)),
        }
    }
    for ((key, record), version) in grants.iter().zip(versions) {
        match store
            .save(key, record, version)
            .await
            .map_err(|e| Failure::store(format!("cannot write `{key}`"), e))?
        {
            Cas::Saved(_) => eprintln!("imported `{key}`"),
            Cas::Conflict => {
                return Err(Failure::refused(format!(
                    "`{key}` changed in the store during the import; it and the grants after \
                     it were not imported"
                )))
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Move,
    Copy,
}

async fn transfer(args: &TransferArgs, mode: Mode) -> Result<(), Failure> {
    let from_url = StoreUrl::parse(&args.from)?;
    let to_url = StoreUrl::parse(&args.to)?;
    if from_url.same_store(&to_url) {
        return Err(Failure::usage(format!(
            "--from and --to name the same store ({})",
            from_url.redacted()
        )));
    }
    let from = from_url.open(&args.source_keys(), Access::Read).await?;
    let to = to_url.open(&args.destination_keys(), Access::Write).await?;
    let to_shown = to_url.redacted();
    let ends = Ends {
        from: &*from,
        to: &*to,
        to_shown: &to_shown,
        force: args.force,
    };
    let keys = if args.all {
        all_keys(&*from).await?
    } else {
        args.keys
            .iter()
            .map(|k| key_of(k))
            .collect::<Result<_, _>>()?
    };
    for key in &keys {
        if args.all && is_moved(&*from, key).await? {
            eprintln!("skipped `{key}`: already moved");
            continue;
        }
        match mode {
            Mode::Move => {
                transfer::move_grant(&ends, key).await?;
                eprintln!("moved `{key}` to {to_shown}");
            }
            Mode::Copy => {
                transfer::copy_grant(&ends, key).await?;
                eprintln!("copied `{key}` to {to_shown}");
            }
        }
    }
    Ok(())
}

async fn is_moved(store: &dyn TokenStore, key: &TokenKey) -> Result<bool, Failure> {
    Ok(store
        .load(key)
        .await
        .map_err(|e| Failure::store(format!("cannot read `{key}`"), e))?
        .is_some_and(|loaded| loaded.value.moved_to().is_some()))
}

#[cfg(feature = "encryption")]
async fn rekey(args: &StoreArgs) -> Result<(), Failure> {
    let url = StoreUrl::parse(&args.store)?;
    let keys = args.keys()?;
    let plain = url
        .open(&crate::keys::KeyArgs::default(), Access::Read)
        .await?;
    let Some(store) = keys.encrypted(plain)? else {
        return Err(Failure::usage(
            "rekey needs the store's current key (--key-env or --key-file, with --key-id)",
        ));
    };
    let report = store
        .rekey()
        .await
        .map_err(|e| Failure::store("rekey stopped", e))?;
    print(&format!(
        "rewritten {}, already current {}, failed {}\n",
        report.rewritten,
        report.current,
        report.failed.len()
    ))?;
    for (key, error) in &report.failed {
        Failure::store(format!("cannot rekey `{key}`"), error).warn();
    }
    if !report.failed.is_empty() {
        return Err(Failure::runtime(format!(
            "{} grant(s) could not be re-encrypted (listed above)",
            report.failed.len()
        )));
    }
    Ok(())
}

#[cfg(not(feature = "encryption"))]
async fn rekey(_args: &StoreArgs) -> Result<(), Failure> {
    Err(Failure::usage(
        "this tokenkeeper was built without the `encryption` feature",
    ))
}
