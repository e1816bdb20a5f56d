//! Reading a configuration: the file, its `${VAR}` references, TOML parsing that names the
//! key at fault, the `PGTETHER_*` environment overrides, and validation.

use std::path::Path;

use super::{env, Config, ConfigError};

impl Config {
    /// Reads a config file, substitutes `${VAR}` references, parses it, applies the
    /// `PGTETHER_*` environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] with the environment given as a lookup function.
    pub fn load_with_env(
        path: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        let text = env::substitute(&text, &origin, lookup)?;
        let mut config = Config::deserialize_text(&text, &origin)?;
        let used = env::apply_overrides(&mut config, lookup)?;
        config.validate(&origin).map_err(|e| match e {
            // A value that came from the environment is named by its variable too.
            ConfigError::Invalid { path, key, message } => {
                match env::OVERRIDES
                    .iter()
                    .find(|(var, k)| *k == key && used.contains(var))
                {
                    Some((var, _)) => ConfigError::Invalid {
                        path,
                        message: format!("{message} (set by environment variable {var})"),
                        key,
                    },
                    None => ConfigError::Invalid { path, key, message },
                }
            }
            e => e,
        })?;
        Ok(config)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config = Config::deserialize_text(text, origin)?;
        config.validate(origin)?;
        Ok(config)
    }

    fn deserialize_text(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().message().trim().to_string();
            ConfigError::Parse {
                path: origin.to_string(),
                key,
                message,
            }
        })?;
        Ok(config)
    }
}
