//! Logging: the process log (tracing, text or JSON) whose filter can change at run time
//! (admin `/logging`). The access log (`proxy::access_log`) writes under the target `access`
//! of this log (filter it with e.g. `--log-level info,access=off`).

mod filter;

pub use filter::FilterError;

use std::{
    io::IsTerminal,
    sync::{Mutex, OnceLock},
};

use clap::ValueEnum;
use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The installed filter, replaceable while running.
static FILTER: OnceLock<(reload::Handle<EnvFilter, Registry>, Mutex<String>)> = OnceLock::new();
/// The filter given at start, which `/logging?reset` returns to.
static START_FILTER: OnceLock<String> = OnceLock::new();

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`info`,
/// `info,ambit::capture=debug`, ...).
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let parsed =
        EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("invalid --log-level {filter:?}: {e}"))?;
    let (layer, handle) = reload::Layer::new(parsed);
    let registry = tracing_subscriber::registry().with(layer);
    match format {
        // Colours only for a terminal: log files and collectors get plain text.
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr))
            .try_init()?,
        LogFormat::Json => {
            registry.with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).try_init()?
        }
    }
    let _only_the_first_init_counts = FILTER.set((handle, Mutex::new(filter.to_string())));
    let _only_the_first_start_counts = START_FILTER.set(filter.to_string());
    Ok(())
}

/// The filter in force.
pub fn current_filter() -> String {
    FILTER.get().map(|(_, f)| f.lock().unwrap_or_else(|p| p.into_inner()).clone()).unwrap_or_default()
}

/// Replaces the filter (`RUST_LOG` syntax); on error nothing changes.
pub fn set_filter(filter: &str) -> Result<(), FilterError> {
    let Some((handle, current)) = FILTER.get() else { return Err(FilterError::NotInitialised) };
    let parsed = EnvFilter::try_new(filter)
        .map_err(|source| FilterError::Invalid { filter: filter.to_string(), source })?;
    handle.reload(parsed).map_err(FilterError::Reload)?;
    *current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_string();
    tracing::info!(filter, "log filter changed");
    Ok(())
}

/// Changes the filter the way ztunnel's `/logging?level=<clauses>[&reset]` does (see
/// [`filter`]): the clauses merged into the filter in force, or, with `reset`, into the
/// filter given at start. Returns the new filter; on error nothing changes.
pub fn change_filter(clauses: Option<&str>, reset: bool) -> Result<String, FilterError> {
    let base = if reset { START_FILTER.get().cloned().unwrap_or_default() } else { current_filter() };
    let base = filter::Directives::parse_any(&base);
    let next = match clauses {
        Some(c) => base.merge(c)?,
        None => base,
    };
    let text = next.to_string();
    set_filter(&text)?;
    Ok(text)
}
