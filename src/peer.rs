//! Who is on the other end of a client connection: a TCP address, or a local process on the
//! Unix-domain socket.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A client's address. Unix-domain clients have no address of their own (they connect from
/// an unnamed socket); like PostgreSQL, pgtether shows them as `[local]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl Peer {
    /// The IP address, canonical (an IPv4 client of an IPv6 socket shows as IPv4); `None`
    /// for a Unix-domain client.
    pub fn ip(self) -> Option<IpAddr> {
        match self {
            Peer::Tcp(a) => Some(a.ip().to_canonical()),
            Peer::Unix => None,
        }
    }

    /// The host as PostgreSQL's messages name it: the IP address, or `[local]`.
    pub fn host(self) -> String {
        match self.ip() {
            Some(ip) => ip.to_string(),
            None => LOCAL.to_string(),
        }
    }

    pub fn port(self) -> Option<u16> {
        match self {
            Peer::Tcp(a) => Some(a.port()),
            Peer::Unix => None,
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(a: SocketAddr) -> Peer {
        Peer::Tcp(a)
    }
}

const LOCAL: &str = "[local]";

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str(LOCAL),
        }
    }
}

/// As the string shown: a TCP peer is written exactly as a `SocketAddr` was before Unix
/// sockets existed, so an older process's takeover records still read.
impl Serialize for Peer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Peer {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Peer, Self::Err> {
        if s == LOCAL {
            return Ok(Peer::Unix);
        }
        s.parse().map(Peer::Tcp)
    }
}

impl<'de> Deserialize<'de> for Peer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Peer, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_it_writes_and_old_socket_addrs() {
        for peer in [Peer::Unix, Peer::Tcp("10.1.2.3:5432".parse().unwrap())] {
            let json = serde_json::to_string(&peer).unwrap();
            assert_eq!(serde_json::from_str::<Peer>(&json).unwrap(), peer);
        }
        let old: SocketAddr = "[::1]:6432".parse().unwrap();
        let json = serde_json::to_string(&old).unwrap();
        assert_eq!(serde_json::from_str::<Peer>(&json).unwrap(), Peer::Tcp(old));
        assert!(serde_json::from_str::<Peer>("\"unix\"").is_err());
    }

    #[test]
    fn ipv4_clients_of_ipv6_sockets_show_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(Peer::from(mapped).ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(Peer::Unix.ip(), None);
    }
}
