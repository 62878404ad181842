//! The task event bus: every committed change of a task, in process.
//!
//! On PostgreSQL, changes also travel between instances through
//! LISTEN/NOTIFY (see `crate::pg_listener`).
use std::sync::Arc;

use entity::Task;
use tokio::sync::{broadcast, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskEventKind {
    Created,
    Updated,
    Deleted,
}

impl TaskEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "created" => Some(Self::Created),
            "updated" => Some(Self::Updated),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// A committed change; `task` is the state right after it (the last state for a deletion).
#[derive(Debug, Clone)]
pub struct TaskEvent {
    pub kind: TaskEventKind,
    pub task: Task,
}

/// Broadcast of task events. Receivers that fall behind get `Lagged` and
/// re-read state instead of making the bus buffer without bound.
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<TaskEvent>>,
    /// Bumped when events may have been missed (the PostgreSQL listener
    /// reconnected): live streams re-read their state.
    resync: Arc<watch::Sender<u64>>,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        let (resync, _) = watch::channel(0);
        Self {
            sender,
            resync: Arc::new(resync),
        }
    }

    pub fn publish(&self, event: TaskEvent) {
        // No receivers is fine: nobody is watching.
        let _ = self.sender.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.sender.subscribe()
    }

    /// Tells every live stream that events may have been lost.
    pub fn request_resync(&self) {
        self.resync.send_modify(|epoch| *epoch += 1);
    }

    pub fn resyncs(&self) -> watch::Receiver<u64> {
        self.resync.subscribe()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(4096)
    }
}
