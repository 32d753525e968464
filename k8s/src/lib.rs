//! # vitaltrail-k8s
//!
//! **Status: planned.** Holds the Kubernetes manifests for the distributed
//! mode (ingest as a Deployment scaled by Kafka partitions, attestor as a
//! StatefulSet with a volume per replica, anchor and query), and the test that
//! validates them with `kubernetes-validate --strict`.
