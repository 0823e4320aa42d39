//! How the listing commands print (`--output`): an aligned table for people, JSON for scripts.

use clap::ValueEnum;
use serde_json::Value;

/// `--output table | json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns, one row per item.
    Table,
    /// The API's JSON: the whole answer for a list, one object per line for a stream.
    Json,
}

/// A table whose columns are as wide as their widest cell.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let padded: Vec<String> = cells
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        let mut out = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }
}

/// A field as a cell: strings bare, missing as `-`, anything else as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 time as `YYYY-MM-DD HH:MM:SS` (UTC, as the API gives it).
pub fn when(v: &Value) -> String {
    match v.as_str() {
        Some(t) if t.len() >= 19 => t[..19].replacen('T', " ", 1),
        _ => cell(v),
    }
}

/// An RFC 3339 time as `HH:MM:SS.mmm`, for a stream of events.
pub fn clock(v: &Value) -> String {
    match v.as_str() {
        Some(t) if t.len() >= 23 => t[11..23].to_string(),
        _ => when(v),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&["ID", "STATUS"]);
        t.row(vec!["a".into(), "succeeded".into()]);
        t.row(vec!["bcdef".into(), "-".into()]);
        assert_eq!(t.render(), "ID     STATUS\na      succeeded\nbcdef  -\n");
    }

    #[test]
    fn cells_and_times_read_well() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&json!({"a": 1})), r#"{"a":1}"#);
        let t = json!("2026-12-05T21:40:01.123456Z");
        assert_eq!(when(&t), "2026-12-05 21:40:01");
        assert_eq!(clock(&t), "21:40:01.123");
        assert_eq!(when(&json!(null)), "-");
    }
}
