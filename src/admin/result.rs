//! Result sets the admin console sends: RowDescription, DataRows and CommandComplete, with
//! every value in text format (as the simple query protocol sends them).

use std::time::SystemTime;

use bytes::BytesMut;

use crate::protocol::backend;

/// Column types, as PgBouncer's console declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

impl Kind {
    fn oid(self) -> u32 {
        match self {
            Kind::Text => 25,
            Kind::Int => 20,
        }
    }
}

/// One value; `None` is SQL NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell(pub Option<String>);

impl From<&str> for Cell {
    fn from(v: &str) -> Cell {
        Cell(Some(v.to_string()))
    }
}

impl From<String> for Cell {
    fn from(v: String) -> Cell {
        Cell(Some(v))
    }
}

macro_rules! int_cell {
    ($($t:ty),*) => {$(
        impl From<$t> for Cell {
            fn from(v: $t) -> Cell {
                Cell(Some(v.to_string()))
            }
        }
    )*};
}
int_cell!(u16, u32, u64, usize, i32, i64);

/// Flags are 0 or 1, as in PgBouncer.
impl From<bool> for Cell {
    fn from(v: bool) -> Cell {
        Cell(Some(if v { "1" } else { "0" }.to_string()))
    }
}

impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(v: Option<T>) -> Cell {
        v.map(Into::into).unwrap_or(Cell(None))
    }
}

/// Builds a row: `row![a, b, c]` turns each value into a [`Cell`].
#[macro_export]
#[doc(hidden)]
macro_rules! admin_row {
    ($($v:expr),* $(,)?) => {
        vec![$($crate::admin::result::Cell::from($v)),*]
    };
}
pub use crate::admin_row as row;

/// A table with named columns.
#[derive(Debug, Clone)]
pub struct ResultSet {
    pub columns: Vec<(&'static str, Kind)>,
    pub rows: Vec<Vec<Cell>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, Kind)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        assert_eq!(row.len(), self.columns.len(), "row width matches columns");
        self.rows.push(row);
    }

    /// RowDescription, one DataRow per row, CommandComplete `SHOW`.
    pub fn write(&self, out: &mut BytesMut) {
        let columns: Vec<(&str, u32)> = self
            .columns
            .iter()
            .map(|(name, kind)| (*name, kind.oid()))
            .collect();
        backend::row_description(out, &columns);
        for row in &self.rows {
            backend::data_row(out, row.iter().map(|c| c.0.as_deref()));
        }
        backend::command_complete(out, "SHOW");
    }
}

/// A point in time as the console shows it (RFC 3339, UTC, whole seconds).
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration in microseconds as PgBouncer's (seconds, microseconds) column pair.
pub fn split_us(us: u64) -> (u64, u64) {
    (us / 1_000_000, us % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn a_result_set_is_description_rows_and_show() {
        let mut rs = ResultSet::new(&[("name", Kind::Text), ("n", Kind::Int)]);
        rs.push(row!["a", 1u64]);
        rs.push(row![None::<String>, true]);
        let mut out = BytesMut::new();
        rs.write(&mut out);
        assert!(matches!(
            Message::parse(&mut out).unwrap(),
            Some(Message::RowDescription(_))
        ));
        assert!(matches!(
            Message::parse(&mut out).unwrap(),
            Some(Message::DataRow(_))
        ));
        assert!(matches!(
            Message::parse(&mut out).unwrap(),
            Some(Message::DataRow(_))
        ));
        let Some(Message::CommandComplete(c)) = Message::parse(&mut out).unwrap() else {
            panic!("no CommandComplete")
        };
        assert_eq!(c.tag().unwrap(), "SHOW");
    }

    #[test]
    fn durations_split_like_pgbouncer() {
        assert_eq!(split_us(2_500_000), (2, 500_000));
        assert!(timestamp(SystemTime::UNIX_EPOCH).starts_with("1970-01-01T00:00:00"));
    }
}
