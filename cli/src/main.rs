//! `tokenkeeper`: the operator CLI for grants kept by the `tokenkeeper` library.
//!
//! Lists, shows, deletes, exports and imports the grants of a store, moves or copies them
//! between stores (environments), and re-encrypts an encrypted store under its current key.
//! Never prints a secret unless asked (`--include-secrets`); data goes to stdout, messages to
//! stderr, and the exit code says what happened (see `--help`).

#![forbid(unsafe_code)]

mod commands;
mod failure;
mod keys;
mod output;
mod store_url;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::failure::Failure;
use crate::keys::{KeyArgs, KeySource};

const EXIT_CODES: &str = "\
Store URLs:
  file:///DIR                 a FileStore directory
  sqlite:///FILE[?table_prefix=NAME]
                              a SqliteStore database file
  redis://[:PASSWORD@]HOST[:PORT][/DB][?prefix=PREFIX], rediss://…
  postgres://[USER[:PASSWORD]@]HOST[:PORT]/DB[?schema=NAME&table_prefix=PREFIX]
                              a PostgresStore
Add --key-env VAR or --key-file PATH (base64, 32 bytes) to read an EncryptedStore.

Exit codes:
  0  success
  1  a store failed (unreachable, corrupt record, wrong key), or unreadable input
  2  usage: bad arguments, bad store URL, missing key
  3  the grant does not exist
  4  refused: the destination already has the grant (--force), copying a grant with a
     refresh token (--force), a grant already moved, an export without secrets to import

Messages go to stderr, data to stdout. Secrets are printed only with --include-secrets.";

/// Operate on the OAuth grants a `tokenkeeper` store holds.
#[derive(Debug, Parser)]
#[command(name = "tokenkeeper", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, show, delete, export, import, move and copy grants.
    #[command(subcommand, after_help = EXIT_CODES)]
    Grants(GrantsCommand),
    /// Re-encrypt every grant of an encrypted store under its current key (after adding a new
    /// key: --key-id 2 --key-env NEW --old-key-env 1=OLD), or encrypt a store written without
    /// encryption (--accept-unencrypted). Safe while applications refresh.
    #[command(after_help = EXIT_CODES)]
    Rekey {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
enum GrantsCommand {
    /// A table of every grant: key, health, access expiry, refresh-token expiry, last
    /// refresh, last error. No secrets.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One grant's status. No secrets unless --include-secrets.
    Show {
        /// The grant's key.
        key: String,
        #[command(flatten)]
        store: StoreArgs,
        /// As a JSON object.
        #[arg(long)]
        json: bool,
        /// Print the whole stored record as JSON, access and refresh tokens included.
        #[arg(long)]
        include_secrets: bool,
    },
    /// Delete one grant (exit code 3 if there is none).
    Delete {
        /// The grant's key.
        key: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Every grant as JSON lines on stdout. Without --include-secrets the lines are the
    /// listing (no tokens) and cannot be imported.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Include the tokens: each line is the key and the full stored record, for `import`.
        #[arg(long)]
        include_secrets: bool,
    },
    /// Put the grants of an `export --include-secrets` file into the store. Refuses grants
    /// the store already has unless --force.
    Import {
        #[command(flatten)]
        store: StoreArgs,
        /// The JSON lines file (default: stdin).
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Overwrite grants the store already has.
        #[arg(long)]
        force: bool,
    },
    /// Move grants to another store: copy each one, then mark it moved in the source, so
    /// instances still reading the source stop refreshing it and report it moved.
    Move(TransferArgs),
    /// Copy grants to another store without marking the source. A grant with a refresh token
    /// refreshed from both stores dies at the next rotation on rotating providers: needs --force.
    Copy(TransferArgs),
}

/// The store a command works on.
#[derive(Debug, Args)]
struct StoreArgs {
    /// The store's URL (see below).
    #[arg(
        long,
        env = "TOKENKEEPER_STORE",
        value_name = "URL",
        hide_env_values = true
    )]
    store: String,
    /// Read the store's encryption key (base64, 32 bytes) from this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "key_file")]
    key_env: Option<String>,
    /// Read the store's encryption key (base64, 32 bytes) from this file.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// The id of that key (the key that encrypts writes).
    #[arg(long, value_name = "ID", default_value_t = 1)]
    key_id: u32,
    /// An old key that still decrypts records written under ID, from an environment variable
    /// (repeatable).
    #[arg(long, value_name = "ID=VAR")]
    old_key_env: Vec<String>,
    /// An old key that still decrypts records written under ID, from a file (repeatable).
    #[arg(long, value_name = "ID=PATH")]
    old_key_file: Vec<String>,
    /// The encrypted store's namespace (`EncryptedStore::with_namespace`), if it has one.
    #[arg(long, value_name = "NAME")]
    namespace: Option<String>,
    /// Also read records written without encryption (to encrypt them with `rekey`).
    #[arg(long)]
    accept_unencrypted: bool,
}

impl StoreArgs {
    fn keys(&self) -> Result<KeyArgs, Failure> {
        let mut old = Vec::new();
        for text in &self.old_key_env {
            old.push(KeySource::parse_old(text, false)?);
        }
        for text in &self.old_key_file {
            old.push(KeySource::parse_old(text, true)?);
        }
        Ok(KeyArgs {
            current: KeySource::of(self.key_env.clone(), self.key_file.clone())
                .map(|source| (self.key_id, source)),
            old,
            namespace: self.namespace.clone(),
            accept_unencrypted: self.accept_unencrypted,
        })
    }
}

/// `move` and `copy`.
#[derive(Debug, Args)]
struct TransferArgs {
    /// The grants' keys.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    keys: Vec<String>,
    /// Every grant of the source not already moved out of it.
    #[arg(long)]
    all: bool,
    /// The source store's URL.
    #[arg(long, value_name = "URL")]
    from: String,
    /// The destination store's URL.
    #[arg(long, value_name = "URL")]
    to: String,
    /// Overwrite grants the destination already has; for `copy`, also copy grants with a
    /// refresh token.
    #[arg(long)]
    force: bool,
    /// The source's encryption key, from an environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "from_key_file")]
    from_key_env: Option<String>,
    /// The source's encryption key, from a file.
    #[arg(long, value_name = "PATH")]
    from_key_file: Option<PathBuf>,
    /// The id of the source's key.
    #[arg(long, value_name = "ID", default_value_t = 1)]
    from_key_id: u32,
    /// The source's namespace, if it is an encrypted store with one.
    #[arg(long, value_name = "NAME")]
    from_namespace: Option<String>,
    /// The destination's encryption key, from an environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "to_key_file")]
    to_key_env: Option<String>,
    /// The destination's encryption key, from a file.
    #[arg(long, value_name = "PATH")]
    to_key_file: Option<PathBuf>,
    /// The id of the destination's key.
    #[arg(long, value_name = "ID", default_value_t = 1)]
    to_key_id: u32,
    /// The destination's namespace, if it is an encrypted store with one.
    #[arg(long, value_name = "NAME")]
    to_namespace: Option<String>,
}

impl TransferArgs {
    fn source_keys(&self) -> KeyArgs {
        KeyArgs {
            current: KeySource::of(self.from_key_env.clone(), self.from_key_file.clone())
                .map(|source| (self.from_key_id, source)),
            namespace: self.from_namespace.clone(),
            ..KeyArgs::default()
        }
    }

    fn destination_keys(&self) -> KeyArgs {
        KeyArgs {
            current: KeySource::of(self.to_key_env.clone(), self.to_key_file.clone())
                .map(|source| (self.to_key_id, source)),
            namespace: self.to_namespace.clone(),
            ..KeyArgs::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Failure::runtime(format!("cannot start the runtime: {e}")).report(),
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}
