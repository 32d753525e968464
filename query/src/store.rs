//! The object store the `readings` table is read through: the local file
//! system, read-only, showing only **live** Parquet files.
//!
//! The attestor compacts small files into one that covers their whole index
//! range, then deletes the small ones only after a grace period
//! (`vitaltrail_attestor::parquet_out`). A listing that sees both skips the
//! covered ones ([`covered_files`]), so every reading is read exactly once,
//! whether a query lists the directory before, during or after a
//! compaction. Every write, copy and delete is refused: a query can never
//! change the data it reads.
//!
//! Each query opens its own engine, so each lists the files once (and
//! DataFusion's listing cache, which never expires, holds that one
//! snapshot for the query's life: a self-join reads one set of files). An
//! engine must not be kept across queries, or it would keep listing
//! deleted files and never see new exports.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::object_store::local::LocalFileSystem;
use datafusion::object_store::path::Path;
use datafusion::object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use vitaltrail_attestor::parquet_out::covered_files;

/// The local file system, read-only, without covered Parquet files.
#[derive(Debug)]
pub struct LiveFiles {
    inner: Arc<LocalFileSystem>,
}

impl LiveFiles {
    /// Over the whole local file system (`file://` URLs).
    pub fn new() -> Self {
        LiveFiles {
            inner: Arc::new(LocalFileSystem::new()),
        }
    }
}

impl Default for LiveFiles {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for LiveFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveFiles({})", self.inner)
    }
}

fn read_only() -> datafusion::object_store::Error {
    datafusion::object_store::Error::NotSupported {
        source: "the query engine is read-only".into(),
    }
}

/// Drop the covered files of every directory among `objects` (an empty
/// file is no Parquet file: it neither is read nor covers anything).
fn live(objects: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
    let mut by_dir: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for o in objects.into_iter().filter(|o| o.size > 0) {
        let dir = o
            .location
            .as_ref()
            .rsplit_once('/')
            .map_or(String::new(), |(d, _)| d.to_owned());
        by_dir.entry(dir).or_default().push(o);
    }
    let mut out = Vec::new();
    for (_, objs) in by_dir {
        let names: Vec<String> = objs
            .iter()
            .map(|o| o.location.filename().unwrap_or_default().to_owned())
            .collect();
        let covered: std::collections::HashSet<String> =
            covered_files(names.iter().map(String::as_str))
                .into_iter()
                .map(str::to_owned)
                .collect();
        out.extend(
            objs.into_iter()
                .zip(names)
                .filter(|(_, n)| !covered.contains(n))
                .map(|(o, _)| o),
        );
    }
    out
}

#[async_trait]
impl ObjectStore for LiveFiles {
    async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> Result<PutResult> {
        Err(read_only())
    }

    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(read_only())
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        locations.map(|_| Err(read_only())).boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        // The whole listing first: whether a file is covered depends on
        // its siblings.
        let inner = self.inner.list(prefix);
        futures::stream::once(async move {
            let all: Vec<Result<ObjectMeta>> = inner.collect().await;
            let mut ok = Vec::with_capacity(all.len());
            let mut errs = Vec::new();
            for r in all {
                match r {
                    Ok(o) => ok.push(o),
                    Err(e) => errs.push(Err(e)),
                }
            }
            let items: Vec<Result<ObjectMeta>> = errs
                .into_iter()
                .chain(live(ok).into_iter().map(Ok))
                .collect();
            futures::stream::iter(items)
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let r = self.inner.list_with_delimiter(prefix).await?;
        Ok(ListResult {
            common_prefixes: r.common_prefixes,
            objects: live(r.objects),
        })
    }

    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> Result<()> {
        Err(read_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            location: Path::from(path),
            last_modified: Default::default(),
            size,
            e_tag: None,
            version: None,
        }
    }

    #[test]
    fn covered_and_empty_files_are_hidden_per_directory() {
        let got = live(vec![
            meta("r/date=a/p0-000000000000-000000000009.parquet", 10),
            meta("r/date=a/p0-000000000000-000000000004.parquet", 10),
            meta("r/date=a/p0-000000000005-000000000009.parquet", 10),
            // The same range in another day's directory is its own file.
            meta("r/date=b/p0-000000000000-000000000004.parquet", 10),
            // An empty file covers nothing and is not read.
            meta("r/date=b/p0-000000000000-999999999999.parquet", 0),
            // Other partitions are untouched.
            meta("r/date=a/p1-000000000001-000000000002.parquet", 10),
        ]);
        let names: Vec<&str> = got.iter().map(|o| o.location.as_ref()).collect();
        assert_eq!(
            names,
            vec![
                "r/date=a/p0-000000000000-000000000009.parquet",
                "r/date=a/p1-000000000001-000000000002.parquet",
                "r/date=b/p0-000000000000-000000000004.parquet",
            ]
        );
    }
}
