//! SeaORM entities of taskql: the storage shape of a task and of a task
//! type's policy, nothing more.
pub mod task_types;
pub mod tasks;

pub use task_types::{Entity as TaskTypes, Model as TaskTypePolicy};
pub use tasks::{Entity as Tasks, Model as Task, StatusCounts, TaskStatus};
