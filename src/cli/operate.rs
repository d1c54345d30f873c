//! Where an operator command runs: on the store, when this process can open it, or in the
//! `serve` that holds it (sled allows one process per data directory), asked through its admin
//! API with `server.admin_token`. Either way the command yields the same documents, printed
//! the same way.

use std::path::PathBuf;

use rostersync::config::Config;
use rostersync::ops::client::{AdminClient, ClientError};
use rostersync::ops::ErrorCode;
use rostersync::store::{Store, StoreError};
use serde::Serialize;

pub enum Where {
    Store(Store),
    Serve(Remote),
}

/// The running `serve`, and the data directory it holds (for the messages).
pub struct Remote {
    pub client: AdminClient,
    dir: PathBuf,
}

/// Opens the store, or finds the `serve` that holds it. Only sled's lock conflict leads to
/// `serve`: any other failure to open the store is that failure.
pub fn open(config: &Config) -> anyhow::Result<Where> {
    let dir = config.server.data_dir.clone();
    match Store::open_unless_locked(&dir) {
        Ok(s) => Ok(Where::Store(s)),
        Err(StoreError::Locked(_)) => match AdminClient::new(&config.server) {
            Ok(client) => {
                tracing::info!(data_dir = %dir.display(), serve = %client.base(), "the data directory is in use: asking serve through its admin API");
                Ok(Where::Serve(Remote { client, dir }))
            }
            Err(ClientError::NoToken) => anyhow::bail!(
                "the data directory {} is in use by another rostersync process (a running `rostersync serve`?), and this config has no server.admin_token to ask it through its admin API: set server.admin_token to the token serve runs with, or stop serve",
                dir.display()
            ),
            Err(e) => anyhow::bail!(
                "the data directory {} is in use by another rostersync process (a running `rostersync serve`?), which cannot be asked: {e}",
                dir.display()
            ),
        },
        Err(e) => Err(e.into()),
    }
}

impl Remote {
    /// A failed request as the operator should read it (never with the token).
    pub fn error(&self, e: ClientError) -> anyhow::Error {
        let base = self.client.base();
        match e.code() {
            Some(ErrorCode::Unauthorized) => anyhow::anyhow!(
                "serve at {base} refused the admin token: server.admin_token in this config is not the token serve runs with"
            ),
            Some(ErrorCode::Disabled) => anyhow::anyhow!(
                "serve at {base} runs without server.admin_token, so its admin API is off: give serve the same server.admin_token and restart it"
            ),
            _ => match e {
                ClientError::Unreachable { .. } => anyhow::anyhow!(
                    "the data directory {} is in use by another rostersync process, and {e}",
                    self.dir.display()
                ),
                e => anyhow::Error::new(e),
            },
        }
    }
}

/// Prints each document as text now, or all of them as one JSON array at the end.
pub struct Out {
    json: bool,
    docs: Vec<serde_json::Value>,
}

impl Out {
    pub fn new(json: bool) -> Out {
        Out {
            json,
            docs: Vec::new(),
        }
    }

    pub fn doc<T: Serialize>(&mut self, doc: &T, text: &str) -> anyhow::Result<()> {
        if self.json {
            self.docs.push(serde_json::to_value(doc)?);
        } else {
            print!("{text}");
        }
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&self.docs)?);
        }
        Ok(())
    }
}
