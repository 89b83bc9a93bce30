//! The node: its state, persisted before it is acknowledged, audited, and
//! exported as metrics; and the count of in-flight work that decides when a
//! draining node is drained.
//!
//! Order of a transition: decide ([`crate::state::next`]), persist the new
//! record (atomically), audit it, then publish it in memory. A
//! transition that cannot be persisted is refused, except a quarantine, which
//! takes effect in memory anyway (fail closed) and reports the failure.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{watch, Mutex, Notify};

use crate::audit::{AuditLog, AuditRecord};
use crate::metrics::Metrics;
use crate::persist::{self, Loaded, PersistError};
use crate::state::{self, Actor, Event, InvalidTransition, NodeRecord, NodeState};

/// Errors from a transition.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error(transparent)]
    Invalid(#[from] InvalidTransition),
    /// The new state could not be written. For a quarantine the node is
    /// quarantined in memory regardless.
    #[error("the new state could not be saved")]
    Persist {
        applied: bool,
        #[source]
        source: PersistError,
    },
}

/// A completed transition.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: NodeState,
    pub record: NodeRecord,
}

/// The shared node.
#[derive(Debug)]
pub struct Node {
    id: String,
    state_dir: PathBuf,
    /// Serialises transitions (decide, persist, publish).
    lock: Mutex<()>,
    current: watch::Sender<NodeRecord>,
    audit: Arc<AuditLog>,
    metrics: Metrics,
    in_flight: AtomicU64,
    /// Set while a transition that stops new work (drain, quarantine) is
    /// decided, saved and published: work that has not been counted by
    /// the time the transition reads the count is refused, even while the
    /// published state still accepts it.
    closing: AtomicBool,
    /// Quarantines applied since this process started; changed together
    /// with the record it publishes (see [`Node::state_and_quarantines`]).
    quarantines: AtomicU64,
    work_done: Notify,
    _lock: persist::DirLock,
}

/// Clears the flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Proof that a piece of work is in flight; dropping it ends the work.
#[derive(Debug)]
pub struct WorkGuard {
    node: Arc<Node>,
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        if self.node.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.node.work_done.notify_one();
        }
    }
}

/// Errors opening the node at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl Node {
    /// Loads the node from its state directory (blocking; call before the
    /// runtime or off it). A state that could not be trusted has already
    /// been replaced by a persisted quarantine when this returns.
    pub fn open(
        id: String,
        state_dir: &Path,
        audit_recent: usize,
        metrics: Metrics,
    ) -> Result<(Arc<Node>, Loaded), OpenError> {
        let lock = persist::lock_dir(state_dir)?;
        let now = SystemTime::now();
        let loaded = persist::load_state(state_dir, now)?;
        let audit = Arc::new(AuditLog::open(state_dir, audit_recent)?);
        let record = loaded.record().clone();
        match &loaded {
            Loaded::Restored(_) => {}
            Loaded::FirstStart(r) => persist::save_state(state_dir, r)?,
            Loaded::Recovered { record, problem } => {
                persist::save_state(state_dir, record)?;
                audit.append(AuditRecord {
                    ts: now,
                    actor: record.by.clone(),
                    command: "recover".into(),
                    reason: Some(problem.clone()),
                    result: "ok".into(),
                    from: None,
                    to: Some(NodeState::Quarantined),
                })?;
            }
        }
        metrics.set_node_state(record.state, unix_secs(record.since));
        let (current, _) = watch::channel(record);
        let node = Arc::new(Node {
            id,
            state_dir: state_dir.to_owned(),
            lock: Mutex::new(()),
            current,
            audit,
            metrics,
            in_flight: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            quarantines: AtomicU64::new(0),
            work_done: Notify::new(),
            _lock: lock,
        });
        Ok((node, loaded))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn audit_log(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// The current record.
    pub fn snapshot(&self) -> NodeRecord {
        self.current.borrow().clone()
    }

    /// Follows the node's record as it changes (workers use this to stop on
    /// quarantine).
    pub fn subscribe(&self) -> watch::Receiver<NodeRecord> {
        self.current.subscribe()
    }

    /// The state now and the number of quarantines applied since this
    /// process started, read together: work that began while the node was
    /// active and finds the same count later was not quarantined in
    /// between, even if the node is active again (the watch keeps only the
    /// newest record, so the state alone cannot tell).
    pub fn state_and_quarantines(&self) -> (NodeState, u64) {
        let record = self.current.borrow();
        (record.state, self.quarantines.load(Ordering::Acquire))
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Starts a piece of work if the node accepts work now.
    pub fn begin_work(self: &Arc<Self>) -> Option<WorkGuard> {
        // Count first, then check: a transition that stops work sets
        // `closing` and then reads the count, so either it sees this work
        // (and a drain waits for it) or this work sees `closing`. Both
        // orders are SeqCst: neither pair of a store and a later load may
        // be reordered.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = WorkGuard { node: self.clone() };
        if !self.closing.load(Ordering::SeqCst) && self.current.borrow().state.accepts_work() {
            Some(guard)
        } else {
            None
        }
    }

    /// Applies `event` on behalf of `actor`, persisting and auditing it.
    pub async fn transition(
        &self,
        event: Event,
        actor: Actor,
        reason: String,
    ) -> Result<Transition, TransitionError> {
        let _serial = self.lock.lock().await;
        let from_record = self.snapshot();
        let from = from_record.state;
        // Closed to new work before the count is read (see begin_work),
        // and until the new state is published or the change is given up.
        let closes = from.accepts_work()
            && state::next(from, event, self.in_flight()).is_ok_and(|to| !to.accepts_work());
        let _closing = closes.then(|| {
            self.closing.store(true, Ordering::SeqCst);
            ClearOnDrop(&self.closing)
        });
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        let to = match state::next(from, event, in_flight) {
            Ok(to) => to,
            Err(invalid) => {
                self.audit(AuditRecord {
                    ts: SystemTime::now(),
                    actor,
                    command: event.as_str().into(),
                    reason: Some(reason),
                    result: "invalid_transition".into(),
                    from: Some(from),
                    to: None,
                })
                .await;
                return Err(invalid.into());
            }
        };
        let record = NodeRecord {
            state: to,
            reason: reason.clone(),
            by: actor.clone(),
            since: SystemTime::now(),
            seq: from_record.seq + 1,
        };
        let saved = {
            let dir = self.state_dir.clone();
            let record = record.clone();
            tokio::task::spawn_blocking(move || persist::save_state(&dir, &record))
                .await
                .expect("state writer does not panic")
        };
        let failed = saved.err();
        // A file in place but not known durable is what a reader (and,
        // most likely, a restart) finds: applied, and reported.
        let apply = failed.is_none()
            || to == NodeState::Quarantined
            || matches!(failed, Some(PersistError::NotDurable { .. }));
        let result = if failed.is_some() {
            self.metrics.state_write_failures.inc();
            "persist_failed"
        } else {
            "ok"
        };
        // Audit before publishing: whoever sees the new state can find the
        // record of how it came about.
        self.audit(AuditRecord {
            ts: record.since,
            actor: actor.clone(),
            command: event.as_str().into(),
            reason: Some(reason),
            result: result.into(),
            from: Some(from),
            to: apply.then_some(to),
        })
        .await;
        if apply {
            // The count changes under the watch's write lock, with the
            // record: a reader of both sees the two together.
            self.current.send_modify(|current| {
                *current = record.clone();
                if to == NodeState::Quarantined {
                    self.quarantines.fetch_add(1, Ordering::AcqRel);
                }
            });
            self.metrics.set_node_state(to, unix_secs(record.since));
            if to == NodeState::Draining {
                // Work may have ended while we were saving.
                self.work_done.notify_one();
            }
        }
        match failed {
            None => {
                tracing::info!(from = %from, to = %to, by = %actor, reason = %record.reason, "node state changed");
                Ok(Transition { from, record })
            }
            Some(source) => {
                tracing::error!(from = %from, to = %to, applied = apply, error = %source, "node state could not be saved");
                Err(TransitionError::Persist {
                    applied: apply,
                    source,
                })
            }
        }
    }

    /// Appends `record` to the audit log off the runtime; a failure is
    /// counted and logged, never returned (the action stands).
    pub async fn audit(&self, record: AuditRecord) {
        let audit = self.audit.clone();
        let res = tokio::task::spawn_blocking(move || audit.append(record))
            .await
            .expect("audit writer does not panic");
        if let Err(err) = res {
            self.metrics.audit_write_failures.inc();
            tracing::error!(error = %err, "audit record lost");
        }
    }

    /// Moves a draining node to drained when its last work ends, also
    /// for a node that starts up draining. A completion that cannot be
    /// saved is retried. Runs until `stop` fires.
    pub async fn run_drain_watcher(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut retry = false;
        loop {
            if self.snapshot().state == NodeState::Draining && self.in_flight() == 0 {
                // Decided again under the transition lock: work may start
                // (after an undrain and a new drain) between here and there.
                let res = self
                    .transition(
                        Event::DrainComplete,
                        Actor::system("drain"),
                        "all in-flight work finished".into(),
                    )
                    .await;
                retry = matches!(res, Err(TransitionError::Persist { .. }));
                if let Err(err) = res {
                    tracing::debug!(error = %err, "drain completion not applied");
                }
            }
            let backoff = tokio::time::sleep(std::time::Duration::from_secs(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.work_done.notified() => {}
                _ = backoff, if retry => {}
            }
        }
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> Actor {
        Actor::Admin {
            uid: 0,
            gid: 0,
            pid: 7,
        }
    }

    fn open(dir: &Path) -> Arc<Node> {
        Node::open("t".into(), dir, 100, Metrics::new("t"))
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn drain_waits_for_in_flight_work() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path());
        let stop = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn(node.clone().run_drain_watcher(stop.clone()));
        let work = node.begin_work().expect("active node accepts work");
        let t = node
            .transition(Event::Drain, admin(), "maintenance".into())
            .await
            .unwrap();
        assert_eq!(t.record.state, NodeState::Draining);
        assert!(
            node.begin_work().is_none(),
            "draining node takes no new work"
        );
        let mut rx = node.subscribe();
        drop(work);
        rx.wait_for(|r| r.state == NodeState::Drained)
            .await
            .unwrap();
        let last = node.audit_log().recent(1).pop().unwrap();
        assert_eq!(last.command, "drain_complete");
        assert_eq!(last.actor, Actor::system("drain"));
        stop.cancel();
        watcher.await.unwrap();
    }

    /// Work that asks to start while a drain with nothing in flight is
    /// being saved is refused: the node is never `drained` with work in
    /// flight.
    #[tokio::test(flavor = "current_thread")]
    async fn work_asking_while_a_drain_is_saved_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path());
        let drain = {
            let node = node.clone();
            tokio::spawn(async move {
                node.transition(Event::Drain, admin(), "maintenance".into())
                    .await
            })
        };
        // On this one thread the drain runs until it waits for its state
        // file to be written: it then holds the transition lock, the new
        // state not yet published.
        while node.lock.try_lock().is_ok() {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            node.snapshot().state,
            NodeState::Active,
            "not yet published"
        );
        let work = node.begin_work();
        assert!(work.is_none(), "work started during the drain");
        let t = drain.await.unwrap().unwrap();
        assert_eq!(t.record.state, NodeState::Drained);
        assert_eq!(node.in_flight(), 0);
        // A drain given up leaves the node taking work again.
        node.transition(Event::Undrain, admin(), "done".into())
            .await
            .unwrap();
        std::fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
        node.transition(Event::Drain, admin(), "x".into())
            .await
            .unwrap_err();
        assert!(node.begin_work().is_some(), "still active");
    }

    /// A state file renamed into place whose directory cannot be synced is
    /// what the node now reads: the change is applied (and reported as not
    /// durable), not refused with the new state on disk.
    #[tokio::test]
    async fn a_saved_state_that_may_not_be_durable_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path());
        persist::FAIL_DIR_SYNC
            .lock()
            .unwrap()
            .push(dir.path().to_owned());
        let err = node
            .transition(Event::Drain, admin(), "x".into())
            .await
            .unwrap_err();
        persist::FAIL_DIR_SYNC
            .lock()
            .unwrap()
            .retain(|d| d != dir.path());
        assert!(
            matches!(
                err,
                TransitionError::Persist {
                    applied: true,
                    source: PersistError::NotDurable { .. }
                }
            ),
            "{err:?}"
        );
        assert_eq!(node.snapshot().state, NodeState::Drained);
        let last = node.audit_log().recent(1).pop().unwrap();
        assert_eq!(
            (last.result.as_str(), last.to),
            ("persist_failed", Some(NodeState::Drained))
        );
        drop(node);
        assert_eq!(
            open(dir.path()).snapshot().state,
            NodeState::Drained,
            "as on disk"
        );
    }

    #[tokio::test]
    async fn transitions_are_persisted_before_they_are_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path());
        node.transition(Event::Quarantine, admin(), "xid 48".into())
            .await
            .unwrap();
        drop(node);
        let node = open(dir.path());
        let r = node.snapshot();
        assert_eq!(r.state, NodeState::Quarantined);
        assert_eq!(r.reason, "xid 48");
        assert_eq!(r.by, admin());
        assert_eq!(r.seq, 1);
    }

    #[tokio::test]
    async fn refused_transitions_change_nothing_and_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path());
        let err = node
            .transition(Event::Release, admin(), "nothing to release".into())
            .await
            .unwrap_err();
        assert!(matches!(err, TransitionError::Invalid(_)));
        assert_eq!(node.snapshot().state, NodeState::Active);
        let last = node.audit_log().recent(1).pop().unwrap();
        assert_eq!(last.result, "invalid_transition");
    }

    #[tokio::test]
    async fn quarantine_applies_even_when_it_cannot_be_saved() {
        let dir = tempfile::tempdir().unwrap();
        let node = open(dir.path());
        // Make the state file's temporary name unusable: a directory.
        std::fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
        let err = node
            .transition(Event::Drain, admin(), "x".into())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            TransitionError::Persist { applied: false, .. }
        ));
        assert_eq!(node.snapshot().state, NodeState::Active);
        let err = node
            .transition(Event::Quarantine, admin(), "y".into())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            TransitionError::Persist { applied: true, .. }
        ));
        assert_eq!(node.snapshot().state, NodeState::Quarantined);
    }
}
