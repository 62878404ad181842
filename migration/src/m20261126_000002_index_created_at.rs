use sea_orm_migration::prelude::*;

/// Workers list every user's tasks, newest first; without this index that
/// is a scan and sort of the whole table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Id,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("tasks_created_idx")
                    .table(Tasks::Table)
                    .col((Tasks::CreatedAt, IndexOrder::Desc))
                    .col((Tasks::Id, IndexOrder::Desc))
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("tasks_created_idx")
                    .table(Tasks::Table)
                    .to_owned(),
            )
            .await
    }
}
