//! Job results and batch files in a blob store, through `object_store`: a
//! directory of the gateway's disk by default, or an S3-compatible bucket
//! (`[jobs] results_url`), which every gateway of a cluster can share. A result is written
//! as the answer streams in, never held whole, and read back as a stream.
//!
//! Results are kept by tier; [`super::store::expire`] marks the jobs whose
//! time is up, and [`ResultStore::delete`] frees their bytes.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("result store: {0}")]
    Store(#[from] object_store::Error),
    #[error("result store: {0}")]
    Io(#[from] std::io::Error),
}

/// Where job results live.
#[derive(Clone)]
pub struct ResultStore {
    store: Arc<dyn ObjectStore>,
}

impl ResultStore {
    /// Results in `dir` (created when missing).
    pub fn local(dir: &FsPath) -> Result<Self, ResultError> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new_with_prefix(dir)?),
        })
    }

    /// Results in an S3-compatible bucket, `s3://bucket/prefix`: credentials,
    /// region and endpoint come from the usual `AWS_*` variables
    /// (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for a MinIO on plain HTTP).
    pub fn s3(url: &str) -> Result<Self, ResultError> {
        let bucket = AmazonS3Builder::from_env().with_url(url).build()?;
        let prefix = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or("", |(_, prefix)| prefix.trim_matches('/'));
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(bucket)
        } else {
            Arc::new(PrefixStore::new(bucket, prefix))
        };
        Ok(Self { store })
    }

    /// A job's result's key: under its account, so a listing by account
    /// needs no lookup.
    pub fn key(account_id: Uuid, job_id: Uuid) -> String {
        format!("results/{account_id}/{job_id}")
    }

    /// Writes `body` under `key` as it arrives; returns its size. A body
    /// that fails midway leaves nothing behind.
    pub async fn write(
        &self,
        key: &str,
        body: impl Stream<Item = std::io::Result<Bytes>>,
    ) -> Result<u64, ResultError> {
        let mut writer = BufWriter::new(Arc::clone(&self.store), Path::from(key));
        let mut body = std::pin::pin!(body);
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    let _ = writer.abort().await;
                    return Err(error.into());
                }
            };
            if let Err(error) = writer.write_all(&chunk).await {
                let _ = writer.abort().await;
                return Err(error.into());
            }
            written += chunk.len() as u64;
        }
        writer.shutdown().await?;
        Ok(written)
    }

    /// The result under `key`, as a stream.
    pub async fn read(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, ResultError>>, ResultError> {
        let result = self.store.get(&Path::from(key)).await?;
        Ok(result.into_stream().map_err(ResultError::from).boxed())
    }

    /// The whole object under `key`, for what is read whole (a batch's
    /// input, an answer going into a batch's output).
    pub async fn read_all(&self, key: &str) -> Result<Bytes, ResultError> {
        Ok(self.store.get(&Path::from(key)).await?.bytes().await?)
    }

    /// Deletes the result under `key`; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ResultError> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
