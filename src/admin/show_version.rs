//! SHOW VERSION: pgtether's name and version.

use super::result::{row, Kind, ResultSet};

pub fn run() -> ResultSet {
    let mut rs = ResultSet::new(&[("version", Kind::Text)]);
    rs.push(row![format!("pgtether {}", env!("CARGO_PKG_VERSION"))]);
    rs
}
