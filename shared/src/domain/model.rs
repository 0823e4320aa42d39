//! The model registry (docs/models.md, decision in docs/models-design.md): every model *name*
//! of a namespace is one `model` stream. Each `ModelRegistered` on it is a version
//! (`sentiment@1`, `sentiment@2`, …) that a `finetune.train` job trained; `ModelDeleted` removes
//! one version or all of them. Version numbers are never reused, and because a registration
//! expects the stream's version, two trainings of one name cannot take the same number. The
//! fold is the `models` row.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    job::Artifact,
    FieldError,
};

/// Longest model name, in characters.
pub const MAX_NAME: usize = 64;

/// Whether `name` can name a model: 1-64 letters, digits, '.', '_' or '-', starting with a
/// letter or digit (so `name@3` and ids stay unambiguous).
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// [`name_ok`] as a field check.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name_ok(name) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "must be 1-{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter \
                 or digit"
            ),
        ))
    }
}

/// The stream of model name `name` in `namespace` (one per name, so its versions are ordered).
pub fn stream_id(namespace: &str, name: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("capibara:model:{namespace}/{name}").as_bytes(),
    )
}

/// How clients name a model: `sentiment` (its latest version), `sentiment@3`, or a version's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Id(Uuid),
    Latest(String),
    Version(String, u32),
}

impl FromStr for ModelRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = s.parse::<Uuid>() {
            return Ok(ModelRef::Id(id));
        }
        let bad = || {
            format!(
                "`{s}` names no model: use `name`, `name@version` (e.g. `sentiment@3`) or a \
                 model id"
            )
        };
        let (name, version) = match s.split_once('@') {
            Some((n, v)) => (
                n,
                Some(v.parse::<u32>().ok().filter(|v| *v > 0).ok_or_else(bad)?),
            ),
            None => (s, None),
        };
        if !name_ok(name) {
            return Err(bad());
        }
        Ok(match version {
            Some(v) => ModelRef::Version(name.to_string(), v),
            None => ModelRef::Latest(name.to_string()),
        })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Id(id) => write!(f, "{id}"),
            ModelRef::Latest(n) => f.write_str(n),
            ModelRef::Version(n, v) => write!(f, "{n}@{v}"),
        }
    }
}

/// The `format` of a trained model file (`model.safetensors`), whoever trained it.
pub const MODEL_FORMAT: &str = "capibara-classifier/1";
/// The safetensors metadata key holding a model file's [`ModelInfo`] (as a JSON string).
pub const MODEL_META_KEY: &str = "capibara";
/// Longest safetensors header read when a model file is checked.
pub const MAX_MODEL_HEADER: u64 = 1 << 20;

/// What a trained model file says about itself: the JSON under the `capibara` key of its
/// safetensors metadata (docs/models.md, "The model file").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// [`MODEL_FORMAT`].
    pub format: String,
    /// The encoder the head reads (`all-minilm-l6-v2`).
    pub base: String,
    /// The classes, in the order of the head's outputs.
    pub labels: Vec<String>,
    /// Tokens of a text the encoder reads for it.
    pub max_length: u32,
    /// The encoder's last layers this model trained (and holds); 0: the encoder is the base
    /// model's, and the head reads its sentence vectors.
    #[serde(default)]
    pub train_layers: u32,
}

/// Check a model file's safetensors header (the JSON after its 8-byte length) as a file that
/// `model.classify` can serve: our format on an available base, 2-100 distinct labels, and a
/// float32 head `head.weight` [labels, 384] / `head.bias` [labels]. Returns what it says; the
/// error says what is wrong. (A file that trained encoder layers holds them too; the worker
/// checks those when it loads the file.)
pub fn check_model_header(header: &[u8]) -> Result<ModelInfo, String> {
    let header: Value = serde_json::from_slice(header)
        .map_err(|e| format!("its safetensors header is not JSON: {e}"))?;
    let info = header
        .pointer(&format!("/__metadata__/{MODEL_META_KEY}"))
        .and_then(Value::as_str)
        .ok_or("its safetensors metadata has no `capibara` key")?;
    let info: ModelInfo = serde_json::from_str(info)
        .map_err(|e| format!("its `capibara` metadata is not a model description: {e}"))?;
    if info.format != MODEL_FORMAT {
        return Err(format!(
            "its format is `{}`, not `{MODEL_FORMAT}`",
            info.format
        ));
    }
    let bases = super::kinds::model::BASE_MODELS;
    if !bases.contains(&info.base.as_str()) {
        return Err(format!(
            "its base `{}` is not available; available: {}",
            info.base,
            bases.join(", ")
        ));
    }
    let n = info.labels.len();
    let distinct: std::collections::BTreeSet<&String> = info.labels.iter().collect();
    if !(2..=super::kinds::model::MAX_LABELS).contains(&n)
        || distinct.len() != n
        || info
            .labels
            .iter()
            .any(|l| l.trim().is_empty() || l.chars().count() > 100)
    {
        return Err("its labels must be 2-100 distinct names of 1-100 characters".into());
    }
    if !(8..=256).contains(&info.max_length) || info.train_layers > 6 {
        return Err("its max_length must be 8-256 and train_layers 0-6".into());
    }
    let dims = super::kinds::model::EMBED_DIMENSIONS as u64;
    for (name, shape) in [
        ("head.weight", vec![n as u64, dims]),
        ("head.bias", vec![n as u64]),
    ] {
        let t = header
            .get(name)
            .ok_or(format!("it has no tensor `{name}`"))?;
        let ok = t.get("dtype").and_then(Value::as_str) == Some("F32")
            && t.get("shape") == Some(&serde_json::json!(shape));
        if !ok {
            return Err(format!(
                "its tensor `{name}` must be F32 of shape {shape:?}"
            ));
        }
    }
    Ok(info)
}

/// What a finished training registers: everything a version holds but its number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Registration {
    /// The version's id.
    pub id: Uuid,
    pub name: String,
    /// The encoder it was trained on (`all-minilm-l6-v2`).
    pub base: String,
    /// `text_classification`.
    pub task: String,
    /// The classes, in the order of the head's outputs.
    pub labels: Vec<String>,
    /// Tokens of a text the model reads.
    pub max_length: u32,
    /// The training's final figures (`validation_accuracy`, `train_loss`, …).
    #[schema(value_type = Object)]
    pub metrics: Value,
    /// The `finetune.train` (or `finetune.command`) job that trained it.
    pub training_job_id: Uuid,
    /// The weights (`model.safetensors`, an artifact of the training job).
    pub artifact: Artifact,
}

/// Events of a model name's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ModelEvent {
    /// A training finished: version `version` of the name (recorded with the job's success).
    ModelRegistered {
        version: u32,
        #[serde(flatten)]
        registration: Box<Registration>,
    },
    /// Version `version` was deleted, or every version when it is absent.
    ModelDeleted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
}

impl DomainEvent for ModelEvent {
    const STREAM: StreamType = StreamType::Model;

    fn type_name(&self) -> &'static str {
        match self {
            ModelEvent::ModelRegistered { .. } => "ModelRegistered",
            ModelEvent::ModelDeleted { .. } => "ModelDeleted",
        }
    }
}

/// One version of a model, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelVersion {
    pub version: u32,
    /// `name@version`: how `model.classify` names it.
    #[serde(rename = "ref")]
    pub reference: String,
    #[serde(flatten)]
    pub registration: Registration,
    pub created_at: DateTime<Utc>,
}

/// A model name and its live versions (the `models` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelName {
    /// The stream id ([`stream_id`]).
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    /// Live versions, oldest first.
    pub versions: Vec<ModelVersion>,
    /// The number the next registration takes (numbers of deleted versions are not reused).
    pub next_version: u32,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ModelName {
    /// The version `reference` names (`None` if deleted or never registered).
    pub fn find(&self, reference: &ModelRef) -> Option<&ModelVersion> {
        match reference {
            ModelRef::Id(id) => self.versions.iter().find(|v| v.registration.id == *id),
            ModelRef::Latest(_) => self.versions.last(),
            ModelRef::Version(_, n) => self.versions.iter().find(|v| v.version == *n),
        }
    }

    /// The state after `ev` (`None`: the event does not apply).
    pub fn apply(
        prev: Option<ModelName>,
        id: Uuid,
        namespace: &str,
        ev: &ModelEvent,
        at: DateTime<Utc>,
    ) -> Option<ModelName> {
        let mut m = match (prev, ev) {
            (
                None,
                ModelEvent::ModelRegistered {
                    version,
                    registration,
                },
            ) if *version == 1 => ModelName {
                id,
                namespace: namespace.to_string(),
                name: registration.name.clone(),
                versions: Vec::new(),
                next_version: 1,
                version: 0,
                created_at: at,
                updated_at: at,
            },
            (None, _) => return None,
            (Some(m), _) => m,
        };
        match ev {
            ModelEvent::ModelRegistered {
                version,
                registration,
            } => {
                if *version != m.next_version || registration.name != m.name {
                    return None;
                }
                m.versions.push(ModelVersion {
                    version: *version,
                    reference: format!("{}@{version}", m.name),
                    registration: registration.as_ref().clone(),
                    created_at: at,
                });
                m.next_version += 1;
            }
            ModelEvent::ModelDeleted { version: None } => m.versions.clear(),
            ModelEvent::ModelDeleted { version: Some(n) } => {
                let before = m.versions.len();
                m.versions.retain(|v| v.version != *n);
                if m.versions.len() == before {
                    return None;
                }
            }
        }
        m.version += 1;
        m.updated_at = at;
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_headers_are_checked_as_files_classify_can_serve() {
        let header = |info: Value, rows: usize| {
            serde_json::json!({
                "__metadata__": {"capibara": info.to_string()},
                "head.weight": {"dtype": "F32", "shape": [rows, 384], "data_offsets": [0, rows * 1536]},
                "head.bias": {"dtype": "F32", "shape": [rows], "data_offsets": [rows * 1536, rows * 1540]},
            })
            .to_string()
        };
        let info = serde_json::json!({"format": MODEL_FORMAT, "base": "all-minilm-l6-v2",
            "labels": ["neg", "pos"], "max_length": 128, "train_layers": 0});
        let ok = check_model_header(header(info.clone(), 2).as_bytes()).unwrap();
        assert_eq!(ok.labels, ["neg", "pos"]);
        let wrong = |k: &str, v: Value, rows: usize, says: &str| {
            let mut i = info.clone();
            i[k] = v;
            let e = check_model_header(header(i, rows).as_bytes()).unwrap_err();
            assert!(e.contains(says), "{k}: {e}");
        };
        wrong("format", "other/1".into(), 2, "format");
        wrong("base", "bert-large".into(), 2, "base");
        wrong("labels", serde_json::json!(["a", "a"]), 2, "labels");
        wrong(
            "labels",
            serde_json::json!(["a", "b", "c"]),
            2,
            "head.weight",
        );
        wrong("train_layers", 7.into(), 2, "train_layers");
        for bad in ["", "{}", "[1]", r#"{"__metadata__": {"capibara": "{"}}"#] {
            assert!(check_model_header(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    fn reg(name: &str) -> Registration {
        Registration {
            id: Uuid::now_v7(),
            name: name.into(),
            base: "all-minilm-l6-v2".into(),
            task: "text_classification".into(),
            labels: vec!["negative".into(), "positive".into()],
            max_length: 128,
            metrics: serde_json::json!({"validation_accuracy": 0.9}),
            training_job_id: Uuid::now_v7(),
            artifact: Artifact {
                name: "model.safetensors".into(),
                content_type: "application/octet-stream".into(),
                size: 10,
                location: "file:///x".into(),
            },
        }
    }

    #[test]
    fn refs_parse_and_print() {
        for s in ["sentiment", "sentiment@3", "a.b-c_d@12"] {
            assert_eq!(s.parse::<ModelRef>().unwrap().to_string(), s);
        }
        let id = Uuid::now_v7();
        assert_eq!(id.to_string().parse::<ModelRef>(), Ok(ModelRef::Id(id)));
        for bad in ["", "@3", "x@0", "x@", "x@-1", "x y", "-x", "x@3@4"] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_count_up_and_are_not_reused() {
        let id = stream_id("ns", "m");
        let at = crate::domain::now();
        let registered = |v| ModelEvent::ModelRegistered {
            version: v,
            registration: Box::new(reg("m")),
        };
        // A first registration must be version 1; a later one the next number.
        assert!(ModelName::apply(None, id, "ns", &registered(2), at).is_none());
        let m = ModelName::apply(None, id, "ns", &registered(1), at).unwrap();
        assert!(ModelName::apply(Some(m.clone()), id, "ns", &registered(1), at).is_none());
        let m = ModelName::apply(Some(m), id, "ns", &registered(2), at).unwrap();
        assert_eq!(m.versions[1].reference, "m@2");
        let m = ModelName::apply(
            Some(m),
            id,
            "ns",
            &ModelEvent::ModelDeleted { version: Some(2) },
            at,
        )
        .unwrap();
        assert_eq!(m.find(&ModelRef::Latest("m".into())).unwrap().version, 1);
        assert!(m.find(&ModelRef::Version("m".into(), 2)).is_none());
        let m = ModelName::apply(Some(m), id, "ns", &registered(3), at).unwrap();
        assert_eq!(m.next_version, 4);
        assert_eq!(m.version, 4);
        let e = registered(4);
        let (t, data) = e.to_parts();
        assert_eq!(ModelEvent::from_parts(t, data).unwrap(), e);
    }
}
