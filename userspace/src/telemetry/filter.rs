//! Changes to the log filter at run time, in ztunnel's `/logging` syntax: `level=` is a
//! comma-separated list of clauses, each a level (`off`, `error`, `warn`, `info`, `debug`,
//! `trace`) for everything, or `<target>=<level>` (also `<target>:<level>`, the form
//! ztunnel's help and `istioctl ztunnel-config log` show). The clauses are merged into the
//! filter in force, as ztunnel does: a target's new level replaces its old one, a bare level
//! replaces the default; `reset` starts from the filter the process started with. Anything
//! else is refused, naming the clause, and nothing changes.

/// Why the log filter was not changed (and is as it was).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("level is empty: expected e.g. `info` or `access=debug,info`")]
    EmptyLevel,
    #[error("invalid level clause {0:?}: expected a level ({levels}) or <target>=<level>", levels = LEVELS.join(", "))]
    BadClause(String),
    #[error("logging is not initialised")]
    NotInitialised,
    #[error("invalid filter {filter:?}: {source}")]
    Invalid {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("replacing the filter: {0}")]
    Reload(#[source] tracing_subscriber::reload::Error),
}

/// A filter as ordered directives, each keyed by what it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directives(Vec<(Key, String)>);

/// What a directive applies to: everything (a bare level), one target, or something this
/// syntax does not set (a span or field filter given at start), kept as written.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Default,
    Target(String),
    Other(String),
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s))
}

fn is_target(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
}

impl Directives {
    /// Any `RUST_LOG`-style filter (as given at start): split into directives.
    pub fn parse_any(filter: &str) -> Directives {
        Directives(
            filter
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| {
                    let key = match d.split_once('=') {
                        None if is_level(d) => Key::Default,
                        Some((t, l)) if is_target(t) && is_level(l) => Key::Target(t.to_string()),
                        _ => Key::Other(d.to_string()),
                    };
                    (key, d.to_string())
                })
                .collect(),
        )
    }

    /// Merges `clauses` (ztunnel's syntax) into these directives.
    pub fn merge(&self, clauses: &str) -> Result<Directives, FilterError> {
        let mut out = self.0.clone();
        if clauses.trim().is_empty() {
            return Err(FilterError::EmptyLevel);
        }
        for clause in clauses.split(',').map(str::trim) {
            let (key, directive) = if is_level(clause) {
                (Key::Default, clause.to_ascii_lowercase())
            } else {
                // `target=level`, or ztunnel's `target:level` (the last `:`, as targets
                // contain `::`).
                let split = clause.split_once('=').or_else(|| clause.rsplit_once(':'));
                match split {
                    Some((t, l)) if is_target(t) && !t.ends_with(':') && is_level(l) => {
                        (Key::Target(t.to_string()), format!("{t}={}", l.to_ascii_lowercase()))
                    }
                    _ => return Err(FilterError::BadClause(clause.to_string())),
                }
            };
            out.retain(|(k, _)| *k != key);
            out.push((key, directive));
        }
        Ok(Directives(out))
    }
}

impl std::fmt::Display for Directives {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (_, d)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ztunnel_s_clauses_merge_into_the_filter() {
        let start = Directives::parse_any("info,ambit::xds=debug");
        // istioctl ztunnel-config log --level access:debug
        assert_eq!(start.merge("access:debug").unwrap().to_string(), "info,ambit::xds=debug,access=debug");
        assert_eq!(start.merge("access=off,warn").unwrap().to_string(), "ambit::xds=debug,access=off,warn");
        // A target's new level replaces its old one; `::` in targets survives.
        assert_eq!(start.merge("ambit::xds:trace").unwrap().to_string(), "info,ambit::xds=trace");
        assert_eq!(start.merge("DEBUG").unwrap().to_string(), "ambit::xds=debug,debug");
    }

    #[test]
    fn what_the_syntax_does_not_have_is_refused() {
        let start = Directives::parse_any("info");
        for bad in [
            "",
            "loud",
            "access:loud",
            "access=",
            "=debug",
            "[span]=debug",
            "a b=info",
            "access::debug",
            "info,",
        ] {
            let e = start.merge(bad).expect_err(bad).to_string();
            assert!(e.contains("level"), "{bad}: {e}");
        }
    }

    #[test]
    fn start_filters_this_syntax_cannot_express_are_kept() {
        let start = Directives::parse_any("info,[conn{peer=x}]=debug");
        assert_eq!(start.merge("warn").unwrap().to_string(), "[conn{peer=x}]=debug,warn");
    }
}
