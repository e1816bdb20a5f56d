//! Access rules (`[[hba]]`, in the spirit of PostgreSQL's pg_hba.conf): which (database, user,
//! client address) may log in, and with which authentication method.
//!
//! This module owns rule matching only; the config module parses and validates the rules, and
//! the login path (`session::startup`) asks [`decide`] once per login, before any password is
//! exchanged, so a refused address learns nothing about which databases or users exist.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::{AuthMethod, HbaRule};
use crate::peer::Peer;

/// The client addresses a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressMatch {
    /// Every client, TCP or Unix-domain.
    All,
    /// Clients on the Unix-domain socket (PostgreSQL's `local` lines).
    Local,
    /// TCP clients in this block.
    Net(IpNet),
}

/// An `address` that is neither `all`, `local`, a CIDR block nor a single address.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid address {0:?}: expected a CIDR block such as \"10.0.0.0/8\" or \"::1/128\", a single address, \"local\" (Unix-socket clients) or \"all\"")]
pub struct BadAddress(pub String);

impl FromStr for AddressMatch {
    type Err = BadAddress;

    fn from_str(s: &str) -> Result<Self, BadAddress> {
        let t = s.trim();
        if t == "all" {
            return Ok(AddressMatch::All);
        }
        if t == "local" {
            return Ok(AddressMatch::Local);
        }
        if let Ok(net) = t.parse::<IpNet>() {
            // "10.1.2.3/8" has host bits set; PostgreSQL masks them too, but an operator who
            // wrote it most likely meant something else, so it is refused.
            if net.trunc() != net {
                return Err(BadAddress(s.to_string()));
            }
            return Ok(AddressMatch::Net(net));
        }
        t.parse::<IpAddr>()
            .map(|ip| AddressMatch::Net(IpNet::from(ip)))
            .map_err(|_| BadAddress(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for AddressMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AddressMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressMatch::All => f.write_str("all"),
            AddressMatch::Local => f.write_str("local"),
            AddressMatch::Net(n) => write!(f, "{n}"),
        }
    }
}

impl AddressMatch {
    pub fn contains(&self, peer: Peer) -> bool {
        match (self, peer.ip()) {
            (AddressMatch::All, _) => true,
            (AddressMatch::Local, ip) => ip.is_none(),
            (AddressMatch::Net(net), Some(ip)) => net.contains(&ip),
            (AddressMatch::Net(_), None) => false,
        }
    }
}

/// Why the rules refuse a login. Both are SQLSTATE 28000, worded like PostgreSQL's.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("no [[hba]] rule allows host \"{addr}\", user \"{user}\", database \"{database}\"")]
    NoRule {
        addr: String,
        user: String,
        database: String,
    },
    #[error(
        "[[hba]] rule {rule} rejects host \"{addr}\", user \"{user}\", database \"{database}\""
    )]
    Rejected {
        /// 1-based, as an operator counts the rules in the file.
        rule: usize,
        addr: String,
        user: String,
        database: String,
    },
}

fn name_matches(pattern: &str, name: &str) -> bool {
    pattern == "all" || pattern == name
}

/// The authentication method for a login: the first rule matching (database, user, address)
/// decides; no rules at all means `default` for everyone.
pub fn decide(
    rules: &[HbaRule],
    default: AuthMethod,
    database: &str,
    user: &str,
    addr: Peer,
) -> Result<AuthMethod, Refused> {
    if rules.is_empty() {
        return Ok(default);
    }
    let hit = rules.iter().enumerate().find(|(_, r)| {
        name_matches(&r.database, database)
            && name_matches(&r.user, user)
            && r.address.contains(addr)
    });
    let addr = addr.host();
    match hit {
        Some((i, rule)) => rule.method.auth().ok_or_else(|| Refused::Rejected {
            rule: i + 1,
            addr,
            user: user.to_string(),
            database: database.to_string(),
        }),
        None => Err(Refused::NoRule {
            addr,
            user: user.to_string(),
            database: database.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HbaMethod;

    fn rule(database: &str, user: &str, address: &str, method: HbaMethod) -> HbaRule {
        HbaRule {
            database: database.into(),
            user: user.into(),
            address: address.parse().unwrap(),
            method,
        }
    }

    fn ip(s: &str) -> Peer {
        Peer::Tcp(std::net::SocketAddr::new(s.parse().unwrap(), 40000))
    }

    #[test]
    fn addresses_parse() {
        assert_eq!("all".parse::<AddressMatch>(), Ok(AddressMatch::All));
        assert_eq!("local".parse::<AddressMatch>(), Ok(AddressMatch::Local));
        assert!("10.0.0.0/8".parse::<AddressMatch>().is_ok());
        assert!("::1/128".parse::<AddressMatch>().is_ok());
        assert_eq!(
            "192.168.1.7".parse::<AddressMatch>(),
            Ok(AddressMatch::Net("192.168.1.7/32".parse().unwrap()))
        );
        for bad in [
            "10.0.0/8",
            "10.0.0.0/33",
            "10.1.2.3/8",
            "everyone",
            "",
            "::1/129",
        ] {
            assert!(bad.parse::<AddressMatch>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn no_rules_means_the_global_method() {
        assert_eq!(
            decide(&[], AuthMethod::Md5, "db", "u", ip("10.1.1.1")),
            Ok(AuthMethod::Md5)
        );
    }

    #[test]
    fn first_match_wins() {
        let rules = vec![
            rule("all", "all", "10.0.0.0/8", HbaMethod::Reject),
            rule("app", "all", "all", HbaMethod::Trust),
            rule("all", "all", "all", HbaMethod::ScramSha256),
        ];
        let d = |db: &str, a: &str| decide(&rules, AuthMethod::Md5, db, "bob", ip(a));
        assert!(matches!(
            d("app", "10.2.3.4"),
            Err(Refused::Rejected { rule: 1, .. })
        ));
        assert_eq!(d("app", "192.168.0.1"), Ok(AuthMethod::Trust));
        assert_eq!(d("other", "192.168.0.1"), Ok(AuthMethod::ScramSha256));
    }

    #[test]
    fn no_match_is_refused_naming_everything() {
        let rules = vec![rule("app", "alice", "127.0.0.1/32", HbaMethod::Trust)];
        let e = decide(&rules, AuthMethod::Trust, "app", "bob", ip("127.0.0.1")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("\"127.0.0.1\"") && text.contains("\"bob\"") && text.contains("\"app\"")
        );
    }

    #[test]
    fn ipv4_mapped_clients_match_ipv4_rules() {
        let rules = vec![rule("all", "all", "127.0.0.0/8", HbaMethod::Trust)];
        assert_eq!(
            decide(&rules, AuthMethod::Md5, "d", "u", ip("::ffff:127.0.0.1")),
            Ok(AuthMethod::Trust)
        );
        assert!(decide(&rules, AuthMethod::Md5, "d", "u", ip("::1")).is_err());
    }

    #[test]
    fn unix_socket_clients_match_local_and_all_only() {
        let rules = vec![
            rule("all", "all", "0.0.0.0/0", HbaMethod::Reject),
            rule("all", "admin", "local", HbaMethod::Trust),
            rule("all", "all", "all", HbaMethod::Md5),
        ];
        let d = |user: &str, peer: Peer| decide(&rules, AuthMethod::ScramSha256, "d", user, peer);
        assert_eq!(d("admin", Peer::Unix), Ok(AuthMethod::Trust));
        assert_eq!(d("bob", Peer::Unix), Ok(AuthMethod::Md5));
        assert!(d("admin", ip("127.0.0.1")).is_err());
        let only_local = vec![rule("all", "all", "local", HbaMethod::Trust)];
        let e = decide(&only_local, AuthMethod::Md5, "d", "u", ip("::1")).unwrap_err();
        assert!(e.to_string().contains("host \"::1\""), "{e}");
        let only_tcp = vec![rule("all", "all", "::/0", HbaMethod::Trust)];
        let e = decide(&only_tcp, AuthMethod::Md5, "d", "u", Peer::Unix).unwrap_err();
        assert!(e.to_string().contains("host \"[local]\""), "{e}");
    }
}
