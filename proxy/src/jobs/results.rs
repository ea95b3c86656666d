//! Job results in a blob store, through `object_store`: a directory of the
//! gateway's disk by default (an S3-compatible bucket is a configuration
//! away; every gateway of a cluster must then share it). A result is written
//! as the answer streams in, never held whole, and read back as a stream.
//!
//! Results are kept by tier; [`super::store::expire`] marks the jobs whose
//! time is up, and [`ResultStore::delete`] frees their bytes.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
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

    /// Deletes the result under `key`; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), ResultError> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
