//! SeaORM entities of taskql: the storage shape of a task, nothing more.
pub mod tasks;

pub use tasks::{Entity as Tasks, Model as Task, TaskStatus};
