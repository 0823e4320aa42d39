//! The artifact store: files jobs produce (e.g. `audio.wav`), kept outside Postgres.
//!
//! `CAPIBARA_ARTIFACTS` is a directory (default `.capibara/artifacts`) or an S3-compatible URL
//! `s3://bucket[/prefix]`; S3 settings come from the usual `AWS_*` variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for
//! MinIO/Ceph/moto and the like; plain `http://` endpoints are allowed). Both sides go through
//! the `object_store` crate (Apache Arrow's), which gives local files and S3 the same API
//! including ranged reads, with request signing, retries and multipart handled there.
//!
//! An object lives at `jobs/<job id>/<name>`; the job's [`Artifact`] records its full location
//! (`file:///…` or `s3://bucket/…`), so a reader can tell when it was written to another store.

use std::{ops::Range, path::PathBuf, sync::Arc};

use axum::body::Bytes;
use object_store::{
    aws::AmazonS3Builder, local::LocalFileSystem, path::Path as ObjectPath, Attribute, Attributes,
    GetOptions, GetRange, ObjectStore, PutOptions, PutPayload,
};
use uuid::Uuid;

use crate::domain::job::Artifact;

/// Artifact store failures.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("CAPIBARA_ARTIFACTS: {0}")]
    Config(String),
    #[error("artifact not found")]
    NotFound,
    /// The requested byte range lies outside the object.
    #[error("range not satisfiable (size {size})")]
    BadRange { size: u64 },
    #[error("artifact `{0}` was stored in another artifact store")]
    ElsewhereStored(String),
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
}

/// Bytes read from an artifact.
#[derive(Debug, Clone)]
pub struct ArtifactRead {
    pub bytes: Bytes,
    /// The byte range returned (all of it when no range was asked for).
    pub range: Range<u64>,
    /// The object's full size.
    pub size: u64,
}

/// An artifact being written in pieces ([`ArtifactStore::writer`]).
pub struct ArtifactWriter {
    parts: object_store::WriteMultipart,
    artifact: Artifact,
}

impl ArtifactWriter {
    /// Add `bytes` at the end (waits while too many parts are being uploaded).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), ArtifactError> {
        self.parts.wait_for_capacity(4).await?;
        self.parts.write(bytes);
        self.artifact.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.artifact.size
    }

    /// Store the file; what the job lists.
    pub async fn finish(self) -> Result<Artifact, ArtifactError> {
        self.parts.finish().await?;
        Ok(self.artifact)
    }

    /// Drop what was written: nothing is stored.
    pub async fn abort(self) {
        let _ = self.parts.abort().await;
    }
}

/// A local directory or an S3-compatible bucket; cheap to clone.
#[derive(Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket (empty for local directories).
    prefix: String,
    /// `file:///abs/dir` or `s3://bucket[/prefix]`: the start of every location.
    base: String,
    /// S3 keeps the content type with the object; local files cannot (the job's artifact
    /// record has it either way).
    content_type_attribute: bool,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("base", &self.base)
            .finish()
    }
}

impl ArtifactStore {
    /// Open the store named by a `CAPIBARA_ARTIFACTS` value.
    pub fn open(spec: &str) -> Result<ArtifactStore, ArtifactError> {
        let spec = spec.trim();
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ArtifactError::Config("s3:// URL without a bucket".into()));
            }
            let prefix = prefix.trim_matches('/').to_string();
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .ok()
                .filter(|e| !e.is_empty());
            if let Some(e) = &endpoint {
                builder = builder
                    .with_endpoint(e.clone())
                    .with_allow_http(e.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let s3 = builder
                .build()
                .map_err(|e| ArtifactError::Config(e.to_string()))?;
            let base = if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            };
            return Ok(ArtifactStore {
                inner: Arc::new(s3),
                prefix,
                base,
                content_type_attribute: true,
            });
        }
        let dir = PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
        if dir.as_os_str().is_empty() {
            return Err(ArtifactError::Config("empty path".into()));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| ArtifactError::Config(format!("creating {}: {e}", dir.display())))?;
        let dir = std::fs::canonicalize(&dir)
            .map_err(|e| ArtifactError::Config(format!("{}: {e}", dir.display())))?;
        let local = LocalFileSystem::new_with_prefix(&dir)?;
        Ok(ArtifactStore {
            inner: Arc::new(local),
            prefix: String::new(),
            base: format!("file://{}", dir.display()),
            content_type_attribute: false,
        })
    }

    /// `file:///…` or `s3://…`: where this store's objects live.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn key(&self, job_id: Uuid, name: &str) -> String {
        let key = format!("jobs/{job_id}/{name}");
        if self.prefix.is_empty() {
            key
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The object path of a location this store wrote.
    fn path_of(&self, location: &str) -> Result<ObjectPath, ArtifactError> {
        let rel = location
            .strip_prefix(&self.base)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| ArtifactError::ElsewhereStored(location.to_string()))?;
        let key = if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        };
        ObjectPath::parse(key).map_err(|e| ArtifactError::Store(e.into()))
    }

    /// Store `bytes` as the job's artifact `name` (a plain file name such as `audio.wav`).
    pub async fn put(
        &self,
        job_id: Uuid,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Artifact, ArtifactError> {
        if !valid_name(name) {
            return Err(ArtifactError::Config(format!(
                "`{name}` is not a valid artifact name"
            )));
        }
        let size = bytes.len() as u64;
        let path = ObjectPath::parse(self.key(job_id, name))
            .map_err(|e| ArtifactError::Store(e.into()))?;
        let mut attributes = Attributes::new();
        if self.content_type_attribute {
            attributes.insert(Attribute::ContentType, content_type.to_string().into());
        }
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        self.inner
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await?;
        Ok(Artifact {
            name: name.to_string(),
            content_type: content_type.to_string(),
            size,
            location: format!("{}/jobs/{job_id}/{name}", self.base),
        })
    }

    /// A writer of the job's artifact `name` that takes the file in pieces (a download too
    /// large to hold in memory): uploaded in parts (S3 multipart; a temporary file renamed
    /// at the end for a directory), visible only once [`ArtifactWriter::finish`]ed.
    pub async fn writer(
        &self,
        job_id: Uuid,
        name: &str,
        content_type: &str,
    ) -> Result<ArtifactWriter, ArtifactError> {
        if !valid_name(name) {
            return Err(ArtifactError::Config(format!(
                "`{name}` is not a valid artifact name"
            )));
        }
        let path = ObjectPath::parse(self.key(job_id, name))
            .map_err(|e| ArtifactError::Store(e.into()))?;
        let mut attributes = Attributes::new();
        if self.content_type_attribute {
            attributes.insert(Attribute::ContentType, content_type.to_string().into());
        }
        let opts = object_store::PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = self.inner.put_multipart_opts(&path, opts).await?;
        Ok(ArtifactWriter {
            parts: object_store::WriteMultipart::new(upload),
            artifact: Artifact {
                name: name.to_string(),
                content_type: content_type.to_string(),
                size: 0,
                location: format!("{}/jobs/{job_id}/{name}", self.base),
            },
        })
    }

    /// The object path of `key`, a store-relative key outside `jobs/` (e.g. the event archive's
    /// `events/…`).
    fn object_path(&self, key: &str) -> Result<ObjectPath, ArtifactError> {
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjectPath::parse(full).map_err(|e| ArtifactError::Store(e.into()))
    }

    /// A writer of the object `key` (store-relative; written in parts like [`Self::writer`]):
    /// visible only once finished, and a second write of the same key replaces the first.
    pub async fn object_writer(
        &self,
        key: &str,
        content_type: &str,
    ) -> Result<ArtifactWriter, ArtifactError> {
        let path = self.object_path(key)?;
        let mut attributes = Attributes::new();
        if self.content_type_attribute {
            attributes.insert(Attribute::ContentType, content_type.to_string().into());
        }
        let opts = object_store::PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = self.inner.put_multipart_opts(&path, opts).await?;
        Ok(ArtifactWriter {
            parts: object_store::WriteMultipart::new(upload),
            artifact: Artifact {
                name: key.rsplit('/').next().unwrap_or(key).to_string(),
                content_type: content_type.to_string(),
                size: 0,
                location: format!("{}/{key}", self.base),
            },
        })
    }

    /// The whole object `key` (store-relative).
    pub async fn get_object(&self, key: &str) -> Result<Bytes, ArtifactError> {
        let path = self.object_path(key)?;
        match self.inner.get(&path).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(ArtifactError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// Read an artifact, or the byte range `range` of it (`start..end`, end exclusive; an
    /// end past the object is cut to its size).
    pub async fn get(
        &self,
        location: &str,
        range: Option<Range<u64>>,
    ) -> Result<ArtifactRead, ArtifactError> {
        let path = self.path_of(location)?;
        let size = match self.inner.head(&path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => return Err(ArtifactError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let range = match range {
            Some(r) if r.start >= size || r.start >= r.end => {
                return Err(ArtifactError::BadRange { size })
            }
            Some(r) => Some(r.start..r.end.min(size)),
            None => None,
        };
        if size == 0 {
            return Ok(ArtifactRead {
                bytes: Bytes::new(),
                range: 0..0,
                size,
            });
        }
        let opts = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..Default::default()
        };
        let result = match self.inner.get_opts(&path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(ArtifactError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let range = result.range.clone();
        let bytes = result.bytes().await?;
        Ok(ArtifactRead { bytes, range, size })
    }
}

/// Artifact names are plain file names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_round_trips_whole_and_ranged_reads() {
        let dir = std::env::temp_dir().join(format!("capibara-artifacts-{}", Uuid::now_v7()));
        let store = ArtifactStore::open(dir.to_str().unwrap()).unwrap();
        assert!(store.base().starts_with("file:///"));
        let id = Uuid::now_v7();
        let a = store
            .put(id, "audio.wav", "audio/wav", b"0123456789".to_vec())
            .await
            .unwrap();
        assert_eq!(a.size, 10);
        assert!(a.location.ends_with(&format!("/jobs/{id}/audio.wav")));
        let all = store.get(&a.location, None).await.unwrap();
        assert_eq!(
            (&all.bytes[..], all.size, all.range),
            (&b"0123456789"[..], 10, 0..10)
        );
        let part = store.get(&a.location, Some(2..5)).await.unwrap();
        assert_eq!((&part.bytes[..], part.range), (&b"234"[..], 2..5));
        let tail = store.get(&a.location, Some(7..100)).await.unwrap();
        assert_eq!(&tail.bytes[..], b"789");
        assert!(matches!(
            store.get(&a.location, Some(10..12)).await,
            Err(ArtifactError::BadRange { size: 10 })
        ));
        let missing = a.location.replace("audio.wav", "other.wav");
        assert!(matches!(
            store.get(&missing, None).await,
            Err(ArtifactError::NotFound)
        ));
        assert!(matches!(
            store.get("s3://elsewhere/jobs/x", None).await,
            Err(ArtifactError::ElsewhereStored(_))
        ));
        assert!(store.put(id, "../escape", "x", vec![]).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
