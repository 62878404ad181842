use sea_orm_migration::prelude::*;

/// Indexes led by the task type, for what reads one type at a time:
///
/// - `tasks_type_claim_idx`: a claim of one type, and that type's line
///   (positions), in claim order without stepping over other types' tasks;
/// - `tasks_type_started_idx`: how fast a type's tasks were claimed lately
///   (an estimated start), the latest `started_at` first.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tasks {
    Table,
    Type,
    Status,
    Priority,
    FairRank,
    RunAt,
    Id,
    StartedAt,
}

const CLAIM: &str = "tasks_type_claim_idx";
const STARTED: &str = "tasks_type_started_idx";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(CLAIM)
                    .table(Tasks::Table)
                    .col(Tasks::Type)
                    .col(Tasks::Status)
                    .col((Tasks::Priority, IndexOrder::Desc))
                    .col(Tasks::FairRank)
                    .col(Tasks::RunAt)
                    .col(Tasks::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(STARTED)
                    .table(Tasks::Table)
                    .col(Tasks::Type)
                    .col(Tasks::StartedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in [STARTED, CLAIM] {
            manager
                .drop_index(Index::drop().name(name).table(Tasks::Table).to_owned())
                .await?;
        }
        Ok(())
    }
}
