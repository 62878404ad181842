use sea_orm_migration::prelude::*;

/// `traceparent`: the W3C trace context of the request that created the
/// task (NULL when it was not traced), so the worker that runs the task
/// continues that trace.
///
/// It is appended last, after the columns the migrations before it add:
/// that is where `Task::COLUMNS` expects it. The change log's triggers copy
/// their own list of columns, which leaves it out: a task's trace context
/// is fixed at its create and no subscriber needs it.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Traceparent,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tasks::Table)
                    .add_column(ColumnDef::new(Tasks::Traceparent).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tasks::Table)
                    .drop_column(Tasks::Traceparent)
                    .to_owned(),
            )
            .await
    }
}
