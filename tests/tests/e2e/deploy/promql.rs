//! Just enough PromQL reading to say which metrics and labels an expression uses: metric names
//! with the labels of their selectors, and the labels of `by`/`without`/`on`/`ignoring`
//! clauses. Strings, numbers, durations and Grafana variables (`$queue`) are skipped.

/// A metric an expression reads, with the label names of its selector.
#[derive(Debug, PartialEq)]
pub struct MetricRef {
    pub name: String,
    pub labels: Vec<String>,
}

/// What one expression uses.
#[derive(Debug, Default, PartialEq)]
pub struct Uses {
    pub metrics: Vec<MetricRef>,
    /// Labels named in grouping and matching clauses.
    pub grouping: Vec<String>,
}

/// Whether `name` is one of ours (or the `up` every scrape adds) rather than a function,
/// keyword or label.
fn is_metric(name: &str) -> bool {
    name.starts_with("capibara_") || name.starts_with("process_") || name == "up"
}

pub fn uses(expr: &str) -> Uses {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Uses::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '$' || c.is_ascii_digit() {
            // A Grafana variable, a number or a duration: one token.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let (word, next) = identifier(&chars, i);
            i = next;
            let after = skip_space(&chars, i);
            if is_metric(&word) {
                let mut labels = Vec::new();
                if chars.get(after) == Some(&'{') {
                    let (names, next) = names_until(&chars, after + 1, '}');
                    labels = names;
                    i = next;
                }
                out.metrics.push(MetricRef { name: word, labels });
            } else if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
                && chars.get(after) == Some(&'(')
            {
                let (names, next) = names_until(&chars, after + 1, ')');
                out.grouping.extend(names);
                i = next;
            }
        } else {
            i += 1;
        }
    }
    out
}

fn identifier(chars: &[char], mut i: usize) -> (String, usize) {
    let start = i;
    while i < chars.len()
        && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
    {
        i += 1;
    }
    (chars[start..i].iter().collect(), i)
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// Index after the string literal opening at `i`.
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        j += if chars[j] == '\\' { 2 } else { 1 };
    }
    j + 1
}

/// The identifiers up to `close` (label names; the strings between them skipped), and the
/// index after it.
fn names_until(chars: &[char], mut i: usize, close: char) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    while i < chars.len() && chars[i] != close {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let (word, next) = identifier(chars, i);
            names.push(word);
            i = next;
        } else {
            i += 1;
        }
    }
    (names, i + 1)
}

#[test]
fn reads_metrics_labels_and_grouping_out_of_promql() {
    let u = uses(
        r#"histogram_quantile(0.95, sum by (queue, le) (rate(capibara_job_pickup_latency_seconds_bucket{queue=~"$queue", job="x{y}"}[$__rate_interval])))
           / on() group_left max(up{job=~"capibara-.+"}) > 0.25 or absent(capibara_scheduler_leader)"#,
    );
    assert_eq!(
        u.metrics,
        vec![
            MetricRef {
                name: "capibara_job_pickup_latency_seconds_bucket".into(),
                labels: vec!["queue".into(), "job".into()],
            },
            MetricRef {
                name: "up".into(),
                labels: vec!["job".into()],
            },
            MetricRef {
                name: "capibara_scheduler_leader".into(),
                labels: vec![],
            },
        ]
    );
    assert_eq!(u.grouping, vec!["queue".to_string(), "le".to_string()]);
}
