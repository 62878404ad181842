use sea_orm_migration::prelude::*;

/// A pending task's estimated start reads how fast its type was claimed
/// lately: the latest `started_at` of that type, newest first.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Type,
    StartedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("tasks_type_started_idx")
                    .table(Tasks::Table)
                    .col(Tasks::Type)
                    .col(Tasks::StartedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("tasks_type_started_idx")
                    .table(Tasks::Table)
                    .to_owned(),
            )
            .await
    }
}
