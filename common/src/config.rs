//! Layered configuration, one model per binary:
//! embedded defaults < TOML file < `RELAYGATE_*` environment < CLI flags and `--set`.
//!
//! Environment variables map to keys with `__` between sections:
//! `RELAYGATE_ADMIN__LISTEN=0.0.0.0:9600` sets `admin.listen`. Unknown keys are
//! errors everywhere (every config struct denies unknown fields), so a typo never
//! silently falls back to a default.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

/// Environment variable prefix shared by both binaries.
pub const ENV_PREFIX: &str = "RELAYGATE";
/// Environment variables with the prefix that are not config keys.
const NOT_KEYS: &[&str] = &["RELAYGATE_CONFIG"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("--set expects key=value, got {0:?}")]
    BadSet(String),
}

/// Values given on the command line, applied last.
#[derive(Default, Debug)]
pub struct Overrides(Vec<(String, config::Value)>);

impl Overrides {
    pub fn set(&mut self, key: &str, value: impl Into<config::Value>) {
        self.0.push((key.to_owned(), value.into()));
    }

    pub fn set_list(&mut self, key: &str, values: &[String]) {
        if !values.is_empty() {
            self.set(key, values.to_vec());
        }
    }

    /// Parses one `--set key=value`; keys in `list_keys` take comma-separated lists.
    pub fn parse_set(&mut self, kv: &str, list_keys: &[&str]) -> Result<(), ConfigError> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ConfigError::BadSet(kv.to_owned()))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(ConfigError::BadSet(kv.to_owned()));
        }
        if list_keys.contains(&k) {
            let items: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            self.set(k, items);
        } else {
            self.set(k, v.to_owned());
        }
        Ok(())
    }
}

/// Loads `T` from the layers. `list_keys` names keys whose env value is a comma-separated list.
pub fn load<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
    list_keys: &[&str],
    overrides: Overrides,
) -> Result<T, ConfigError> {
    let invalid = |e: config::ConfigError| ConfigError::Invalid(e.to_string());
    // Start from the embedded defaults so partially given sections keep theirs.
    let defaults = config::Config::try_from(&T::default()).map_err(invalid)?;
    let mut b = config::Config::builder().add_source(defaults);
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Missing(path.display().to_string()));
        }
        b = b.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    // Environment as overrides applied before the command line's, taken as
    // text: an all-digit key or token must stay the string it is (numeric and
    // boolean keys still parse from their text), lists split on commas.
    let mut env = Overrides::default();
    let prefix = format!("{ENV_PREFIX}_");
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(&prefix) && !NOT_KEYS.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (k, v) in vars {
        let key = k[prefix.len()..].to_lowercase().replace("__", ".");
        env.parse_set(&format!("{key}={v}"), list_keys)?;
    }
    for (k, v) in env.0 {
        b = b.set_override(k, v).map_err(invalid)?;
    }
    for (k, v) in overrides.0 {
        b = b.set_override(k, v).map_err(invalid)?;
    }
    b.build()
        .map_err(invalid)?
        .try_deserialize()
        .map_err(invalid)
}

/// The effective configuration as TOML, secrets masked.
pub fn render<T: Serialize>(cfg: &T) -> String {
    toml::to_string_pretty(cfg).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

/// Flags both binaries take, flattened into each one's command line.
#[derive(clap::Args, Debug, Default)]
pub struct CommonOpts {
    /// TOML config file.
    #[arg(short, long, env = "RELAYGATE_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Directory for the identity key (and, on the gateway, join token and leases) [data_dir].
    #[arg(long, global = true)]
    pub data_dir: Option<String>,
    /// Admin API address [admin.listen].
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub admin_listen: Option<String>,
    /// Log format: text or json [log.format].
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or relaygate_gateway=debug [log.level].
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Set any config key, repeatable: --set session.timeout=10s.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl CommonOpts {
    /// Loads `T` with `own` (the binary's flags) plus these, `--set` last.
    pub fn load<T: DeserializeOwned + Serialize + Default>(
        &self,
        mut own: Overrides,
        list_keys: &[&str],
    ) -> Result<T, ConfigError> {
        for (key, v) in [
            ("data_dir", &self.data_dir),
            ("admin.listen", &self.admin_listen),
            ("log.format", &self.log_format),
            ("log.level", &self.log_level),
        ] {
            if let Some(v) = v {
                own.set(key, v.clone());
            }
        }
        for kv in &self.set {
            own.parse_set(kv, list_keys)?;
        }
        load(self.config.as_deref(), list_keys, own)
    }
}
