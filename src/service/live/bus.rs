//! The task event bus: every committed change of a task, in process, as the
//! instance's reader of the change log publishes it (see
//! `super::changelog`), in the log's order.
//!
//! Subscribers listen on a topic (one task, one user's tasks, or every task
//! for workers), so a change wakes only those who watch it: 10k watchers of
//! 10k tasks cost one wake-up per change, not 10k.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use entity::Task;
use tokio::sync::broadcast;
use uuid::Uuid;

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

/// A committed change; `task` is the state right after it (the last state
/// for a deletion); `pos` its position in the change log.
#[derive(Debug, Clone)]
pub struct TaskEvent {
    pub pos: i64,
    pub kind: TaskEventKind,
    pub task: Task,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Changes of one task.
    Task(Uuid),
    /// Changes of every task one user owns.
    User(String),
    /// Changes of every task: a worker's `taskEvents`.
    All,
}

/// Events a slow task watcher may fall behind by before it re-reads instead.
const TASK_TOPIC_CAPACITY: usize = 32;
/// Events a slow `taskEvents` subscriber may fall behind by.
const USER_TOPIC_CAPACITY: usize = 1024;
/// Events a slow worker's `taskEvents` (every user's changes) may fall behind by.
const ALL_TOPIC_CAPACITY: usize = 4096;

struct Inner {
    topics: Mutex<HashMap<Topic, broadcast::Sender<Arc<TaskEvent>>>>,
    published: AtomicU64,
}

#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: Mutex::new(HashMap::new()),
                published: AtomicU64::new(0),
            }),
        }
    }

    fn topics(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Topic, broadcast::Sender<Arc<TaskEvent>>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn publish(&self, event: TaskEvent) {
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        let task_topic = Topic::Task(event.task.id);
        let user_topic = Topic::User(event.task.user_id.clone());
        let event = Arc::new(event);
        let topics = self.topics();
        for topic in [task_topic, user_topic, Topic::All] {
            if let Some(sender) = topics.get(&topic) {
                // Nobody left listening is fine.
                let _ = sender.send(event.clone());
            }
        }
    }

    pub fn subscribe(&self, topic: Topic) -> TopicReceiver {
        let mut topics = self.topics();
        let capacity = match topic {
            Topic::Task(_) => TASK_TOPIC_CAPACITY,
            Topic::User(_) => USER_TOPIC_CAPACITY,
            Topic::All => ALL_TOPIC_CAPACITY,
        };
        let receiver = topics
            .entry(topic.clone())
            .or_insert_with(|| broadcast::channel(capacity).0)
            .subscribe();
        TopicReceiver {
            receiver,
            topic,
            bus: self.clone(),
        }
    }

    /// Runs `advance` if no topic has a listener, while none can start;
    /// says whether it ran. A listener that starts after it sees what
    /// `advance` did.
    pub fn if_unwatched(&self, advance: impl FnOnce()) -> bool {
        let topics = self.topics();
        if topics.is_empty() {
            advance();
            true
        } else {
            false
        }
    }

    /// Events published since start (for /metrics).
    pub fn published_count(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Topics with at least one listener (for /metrics).
    pub fn topic_count(&self) -> usize {
        self.topics().len()
    }
}

/// A listener on one topic; the topic goes away with its last listener.
pub struct TopicReceiver {
    receiver: broadcast::Receiver<Arc<TaskEvent>>,
    topic: Topic,
    bus: EventBus,
}

impl TopicReceiver {
    pub async fn recv(&mut self) -> Result<Arc<TaskEvent>, broadcast::error::RecvError> {
        self.receiver.recv().await
    }
}

impl Drop for TopicReceiver {
    fn drop(&mut self) {
        let mut topics = self.bus.topics();
        // Our own receiver is still alive here, hence `<= 1`.
        if topics
            .get(&self.topic)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            topics.remove(&self.topic);
        }
    }
}
