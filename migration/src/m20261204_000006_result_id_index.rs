use sea_orm_migration::prelude::*;

/// A worker looks a task up by `result_id` alone, over every user's tasks;
/// `tasks_user_result_idx` leads with `user_id` and cannot serve that.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    ResultId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("tasks_result_idx")
                    .table(Tasks::Table)
                    .col(Tasks::ResultId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("tasks_result_idx")
                    .table(Tasks::Table)
                    .to_owned(),
            )
            .await
    }
}
