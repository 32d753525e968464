//! The in-process bus: one bounded channel per partition.
//!
//! A full channel makes [`InProcProducer::send`] wait (backpressure); nothing
//! grows without bound. A record's `send` resolves when the consumer calls
//! [`Delivery::complete`], i.e. after the attestor made its fate durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::{Delivery, Error, Outcome, PartitionSource, Producer, Record, Result, partition_for};

struct Msg {
    offset: u64,
    record: Record,
    ack: oneshot::Sender<Result<Outcome>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msg").field("offset", &self.offset).finish()
    }
}

/// Records each partition of the in-process bus holds in flight, by
/// default (`[bus] capacity`).
pub const DEFAULT_CAPACITY: usize = 8192;

/// Create a bus of `partitions` partitions, each holding at most `capacity`
/// records in flight.
pub fn bus(partitions: u32, capacity: usize) -> (InProcProducer, Vec<InProcPartition>) {
    let partitions = partitions.max(1);
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for p in 0..partitions {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        txs.push(tx);
        rxs.push(InProcPartition { partition: p, rx });
    }
    let producer = InProcProducer {
        inner: Arc::new(Inner {
            txs,
            offsets: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            capacity: capacity.max(1),
        }),
    };
    (producer, rxs)
}

struct Inner {
    txs: Vec<mpsc::Sender<Msg>>,
    offsets: Vec<AtomicU64>,
    capacity: usize,
}

/// The producing end; cheap to clone.
#[derive(Clone)]
pub struct InProcProducer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InProcProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcProducer")
            .field("partitions", &self.inner.txs.len())
            .field("queue_depth", &self.queue_depth())
            .finish()
    }
}

impl Producer for InProcProducer {
    async fn send(&self, record: Record) -> Result<Outcome> {
        let p = partition_for(&record.key, self.inner.txs.len() as u32) as usize;
        let offset = self.inner.offsets[p].fetch_add(1, Ordering::Relaxed);
        let (ack, done) = oneshot::channel();
        self.inner.txs[p]
            .send(Msg {
                offset,
                record,
                ack,
            })
            .await
            .map_err(|_| Error::Closed)?;
        done.await.map_err(|_| Error::Dropped)?
    }

    fn queue_depth(&self) -> usize {
        self.inner
            .txs
            .iter()
            .map(|t| self.inner.capacity - t.capacity())
            .sum()
    }
}

/// The consuming end of one partition.
#[derive(Debug)]
pub struct InProcPartition {
    partition: u32,
    rx: mpsc::Receiver<Msg>,
}

impl PartitionSource for InProcPartition {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max: usize, out: &mut Vec<Delivery>) -> Result<bool> {
        let mut buf = Vec::with_capacity(max.min(1024));
        let n = self.rx.recv_many(&mut buf, max.max(1)).await;
        if n == 0 {
            return Ok(false);
        }
        out.extend(buf.into_iter().map(|m| Delivery {
            partition: self.partition,
            offset: m.offset,
            record: m.record,
            authentic: true,
            ack: Some(m.ack),
        }));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, n: u8) -> Record {
        Record {
            key: key.into(),
            payload: vec![n],
            received_ms: 0,
        }
    }

    #[tokio::test]
    async fn send_resolves_only_when_completed() {
        let (tx, mut parts) = bus(2, 8);
        let key = "did:key:zexample";
        let p = partition_for(key, 2) as usize;
        let sender = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(rec(key, 1)).await }
        });
        let mut out = Vec::new();
        assert!(parts[p].next_batch(10, &mut out).await.unwrap());
        assert_eq!(out.len(), 1);
        assert!(!sender.is_finished());
        let d = out.pop().unwrap();
        assert_eq!(d.record.payload, vec![1]);
        d.complete(Outcome::Logged {
            partition: p as u32,
            index: 0,
        });
        assert_eq!(
            sender.await.unwrap().unwrap(),
            Outcome::Logged {
                partition: p as u32,
                index: 0
            }
        );
    }

    #[tokio::test]
    async fn dropped_delivery_is_an_error_and_full_queue_waits() {
        let (tx, mut parts) = bus(1, 1);
        let a = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(rec("k", 1)).await }
        });
        tokio::task::yield_now().await;
        // The queue holds one; the second send waits for room.
        let b = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(rec("k", 2)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(tx.queue_depth(), 1);
        let mut out = Vec::new();
        parts[0].next_batch(10, &mut out).await.unwrap();
        drop(out);
        assert_eq!(a.await.unwrap(), Err(Error::Dropped));
        let mut out = Vec::new();
        parts[0].next_batch(10, &mut out).await.unwrap();
        out.pop().unwrap().complete(Outcome::Rejected {
            reason: "duplicate".into(),
        });
        assert!(matches!(b.await.unwrap(), Ok(Outcome::Rejected { .. })));
        drop(parts);
        assert_eq!(tx.send(rec("k", 3)).await, Err(Error::Closed));
    }

    #[test]
    fn partitioning_is_stable_and_spread() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[partition_for(&format!("did:key:z{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 850), "{counts:?}");
        assert_eq!(partition_for("x", 4), partition_for("x", 4));
    }
}
