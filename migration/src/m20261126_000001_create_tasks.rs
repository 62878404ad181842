use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Id,
    UserId,
    Type,
    Status,
    ResultId,
    ErrorMessage,
    Metadata,
    Progress,
    Attempts,
    IdempotencyKey,
    WorkerId,
    LeaseExpiresAt,
    CreatedAt,
    UpdatedAt,
    StartedAt,
    CompletedAt,
    Version,
}

const STATUSES: [&str; 5] = ["pending", "processing", "completed", "failed", "cancelled"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Tasks::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Tasks::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Tasks::UserId).text().not_null())
                    .col(ColumnDef::new(Tasks::Type).string_len(64).not_null())
                    .col(ColumnDef::new(Tasks::Status).string_len(16).not_null())
                    .col(ColumnDef::new(Tasks::ResultId).string_len(255).null())
                    .col(ColumnDef::new(Tasks::ErrorMessage).text().null())
                    .col(ColumnDef::new(Tasks::Metadata).json_binary().not_null())
                    .col(ColumnDef::new(Tasks::Progress).integer().null())
                    .col(
                        ColumnDef::new(Tasks::Attempts)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(ColumnDef::new(Tasks::IdempotencyKey).text().null())
                    .col(ColumnDef::new(Tasks::WorkerId).text().null())
                    .col(
                        ColumnDef::new(Tasks::LeaseExpiresAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Tasks::CreatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Tasks::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(Tasks::StartedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Tasks::CompletedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .col(
                        ColumnDef::new(Tasks::Version)
                            .big_integer()
                            .not_null()
                            .default(1),
                    )
                    .check((
                        Alias::new("tasks_status_check"),
                        Expr::col(Tasks::Status).is_in(STATUSES),
                    ))
                    .check((
                        Alias::new("tasks_progress_check"),
                        Expr::col(Tasks::Progress)
                            .is_null()
                            .or(Expr::col(Tasks::Progress).between(0, 100)),
                    ))
                    .to_owned(),
            )
            .await?;

        let indexes = [
            Index::create()
                .name("tasks_user_created_idx")
                .table(Tasks::Table)
                .col(Tasks::UserId)
                .col((Tasks::CreatedAt, IndexOrder::Desc))
                .col((Tasks::Id, IndexOrder::Desc))
                .if_not_exists()
                .to_owned(),
            Index::create()
                .name("tasks_user_status_created_idx")
                .table(Tasks::Table)
                .col(Tasks::UserId)
                .col(Tasks::Status)
                .col((Tasks::CreatedAt, IndexOrder::Desc))
                .if_not_exists()
                .to_owned(),
            Index::create()
                .name("tasks_user_result_idx")
                .table(Tasks::Table)
                .col(Tasks::UserId)
                .col(Tasks::ResultId)
                .if_not_exists()
                .to_owned(),
            Index::create()
                .name("tasks_status_created_idx")
                .table(Tasks::Table)
                .col(Tasks::Status)
                .col(Tasks::CreatedAt)
                .if_not_exists()
                .to_owned(),
            Index::create()
                .name("tasks_status_lease_idx")
                .table(Tasks::Table)
                .col(Tasks::Status)
                .col(Tasks::LeaseExpiresAt)
                .if_not_exists()
                .to_owned(),
            Index::create()
                .name("tasks_user_idempotency_key_idx")
                .table(Tasks::Table)
                .col(Tasks::UserId)
                .col(Tasks::IdempotencyKey)
                .unique()
                .if_not_exists()
                .to_owned(),
        ];
        for index in indexes {
            manager.create_index(index).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Tasks::Table).to_owned())
            .await
    }
}
