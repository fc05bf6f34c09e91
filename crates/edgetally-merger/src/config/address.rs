//! Addresses in configuration, through [`resolve_addr`].

use serde::de::{Deserialize, Deserializer, Error};
use std::net::SocketAddr;

pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    super::resolve_addr(&s).map_err(D::Error::custom)
}

pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| super::resolve_addr(s))
        .collect::<Result<_, _>>()
        .map_err(D::Error::custom)
}
