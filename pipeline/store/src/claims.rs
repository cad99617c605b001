//! The claim stage's state and consumed offsets: committed together, one transaction per batch,
//! fenced by a per-partition epoch that every assignment bumps (`claim_partitions`), so a stale
//! owner after a rebalance can never commit. Rows are plain values; the stage owns their meaning.

use super::copy::CopyEncoder;
use super::{around_generated, Dialect, Store};
use crate::error::StoreError;

mod read;
pub use read::{CouponRow, DecidedClaim, HeldCoupon};

const ASSIGN: &str = include_str!("sql/claims_assign.sql");
const PIN_PARTITIONS: &str = include_str!("sql/claims_pin_partitions.sql");
const FENCE: &str = include_str!("sql/claims_fence.sql");
const OFFSETS: &str = include_str!("sql/claims_offsets.sql");
const INSERT_DEFINITIONS: &str = include_str!("sql/claims_insert_definitions.sql");
const INSERT_HOLDERS: &str = include_str!("sql/claims_insert_holders.sql");
const INSERT_REJECTIONS: &str = include_str!("sql/claims_insert_rejections.sql");
const INSERT_REDEMPTIONS: &str = include_str!("sql/claims_insert_redemptions.sql");
const LOAD_DEFINITIONS: &str = include_str!("sql/claims_load_definitions.sql");
const LOAD_HOLDERS: &str = include_str!("sql/claims_load_holders.sql");
const LOAD_REJECTIONS: &str = include_str!("sql/claims_load_rejections.sql");
const LOAD_REDEMPTIONS: &str = include_str!("sql/claims_load_redemptions.sql");
const FIND_REJECTIONS: &str = include_str!("sql/claims_find_rejections.sql");
const FIND_REJECTIONS_PG: &str = include_str!("sql/postgres/claims_find_rejections.sql");
const COPY_HOLDERS: &str = include_str!("sql/postgres/claims_copy_holders.sql");
const COPY_REJECTIONS: &str = include_str!("sql/postgres/claims_copy_rejections.sql");

/// Rows per INSERT statement: 8 binds each at most stays under SQLite's 32,766 bind limit.
const ROWS_PER_STATEMENT: usize = 2_000;

/// A partition as its new owner takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimOwnership {
    /// The owner's epoch: every commit of this owner names it.
    pub epoch: i64,
    /// The next offset to decide; `None` before the first commit.
    pub next_offset: Option<i64>,
}

/// A coupon's definition. Times are microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionRow {
    pub coupon_id: String,
    pub title: String,
    pub discount_percent: i32,
    pub stock: i32,
    pub opens_at: i64,
    pub closes_at: i64,
    pub valid_for: i64,
}

/// A coupon issued to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    pub coupon_id: String,
    pub user_id: String,
    pub claim_id: String,
    pub code: String,
    pub expires_at: i64,
}

/// A rejected claim and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionRow {
    pub coupon_id: String,
    pub user_id: String,
    pub claim_id: String,
    pub reason: String,
}

/// A redeemed code and the order it was redeemed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedemptionRow {
    pub coupon_id: String,
    pub code: String,
    pub order_id: String,
}

/// Everything a partition's owner decides on, or what one batch adds to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimRows {
    pub definitions: Vec<DefinitionRow>,
    pub holders: Vec<HolderRow>,
    pub rejections: Vec<RejectionRow>,
    pub redemptions: Vec<RedemptionRow>,
}

impl ClaimRows {
    pub fn is_empty(&self) -> bool {
        self.definitions.is_empty()
            && self.holders.is_empty()
            && self.rejections.is_empty()
            && self.redemptions.is_empty()
    }
}

/// How a batch's commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimCommit {
    Committed,
    /// The partition was assigned again since this owner took it: nothing was written.
    Fenced,
}

impl Store {
    /// The input's partition count the state of `consumer` is kept under: `partitions` on the
    /// first call, what the first call recorded on every later one.
    pub async fn pin_claim_partitions(&self, consumer: &str, partitions: i32) -> Result<i32, StoreError> {
        let (pinned,): (i32,) = on_pool!(self, |pool, _Db| {
            sqlx::query_as(PIN_PARTITIONS).bind(consumer).bind(partitions).fetch_one(pool).await?
        });
        Ok(pinned)
    }

    /// Takes `partition` of the claim stage's input for a new owner (on assignment): bumps its
    /// epoch, which fences every earlier owner, and returns it with the stored next offset.
    pub async fn assign_claim_partition(&self, consumer: &str, partition: i32) -> Result<ClaimOwnership, StoreError> {
        let (epoch, next_offset): (i64, Option<i64>) = on_pool!(self, |pool, _Db| {
            sqlx::query_as(ASSIGN).bind(consumer).bind(partition).fetch_one(pool).await?
        });
        Ok(ClaimOwnership { epoch, next_offset })
    }

    /// The next offset of each claim partition of `consumer` that has committed a batch (read only).
    pub async fn claim_offsets(&self, consumer: &str) -> Result<Vec<(i32, i64)>, StoreError> {
        Ok(on_pool!(self, |pool, _Db| sqlx::query_as(OFFSETS).bind(consumer).fetch_all(pool).await?))
    }

    /// The state of every coupon on `partition`, as committed.
    pub async fn load_claim_rows(&self, partition: i32) -> Result<ClaimRows, StoreError> {
        self.load_claims(partition, true).await
    }

    /// What an owner keeps of `partition` in memory: its definitions, holders and redemptions,
    /// bounded by its coupons' stock; `rejections` is empty (see [`Store::find_claim_rejections`]).
    pub async fn load_claim_coupons(&self, partition: i32) -> Result<ClaimRows, StoreError> {
        self.load_claims(partition, false).await
    }

    /// The stored rejections among `claims` (coupon id, user id, claim id), in no order: one
    /// statement for them all on PostgreSQL (an index probe per claim), one per 2,000 claims on
    /// SQLite, so a batch's claims are looked up together.
    pub async fn find_claim_rejections(
        &self,
        claims: &[(String, String, String)],
    ) -> Result<Vec<RejectionRow>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String, String, String)> = match self {
            Store::Postgres(pool) => {
                let column = |f: fn(&(String, String, String)) -> &str| claims.iter().map(f).collect::<Vec<&str>>();
                sqlx::query_as(FIND_REJECTIONS_PG)
                    .bind(column(|c| &c.0))
                    .bind(column(|c| &c.1))
                    .bind(column(|c| &c.2))
                    .fetch_all(pool)
                    .await?
            }
            Store::Sqlite(pool) => {
                let mut found = Vec::new();
                for chunk in claims.chunks(ROWS_PER_STATEMENT) {
                    let (head, tail) = around_generated(FIND_REJECTIONS);
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(head);
                    q.push("VALUES ");
                    let mut first = true;
                    for (coupon_id, user_id, claim_id) in chunk {
                        q.push(if first { "(" } else { ", (" });
                        first = false;
                        q.push_bind(coupon_id.as_str()).push(", ").push_bind(user_id.as_str()).push(", ");
                        q.push_bind(claim_id.as_str()).push(")");
                    }
                    q.push(tail);
                    found.extend(q.build_query_as::<(String, String, String, String)>().fetch_all(pool).await?);
                }
                found
            }
        };
        Ok(rows
            .into_iter()
            .map(|(coupon_id, user_id, claim_id, reason)| RejectionRow { coupon_id, user_id, claim_id, reason })
            .collect())
    }

    async fn load_claims(&self, partition: i32, with_rejections: bool) -> Result<ClaimRows, StoreError> {
        on_pool!(self, |pool, _Db| {
            let definitions: Vec<(String, String, i32, i32, i64, i64, i64)> =
                sqlx::query_as(LOAD_DEFINITIONS).bind(partition).fetch_all(pool).await?;
            let holders: Vec<(String, String, String, String, i64)> =
                sqlx::query_as(LOAD_HOLDERS).bind(partition).fetch_all(pool).await?;
            let rejections: Vec<(String, String, String, String)> = if with_rejections {
                sqlx::query_as(LOAD_REJECTIONS).bind(partition).fetch_all(pool).await?
            } else {
                Vec::new()
            };
            let redemptions: Vec<(String, String, String)> =
                sqlx::query_as(LOAD_REDEMPTIONS).bind(partition).fetch_all(pool).await?;
            Ok(ClaimRows {
                definitions: definitions
                    .into_iter()
                    .map(|(coupon_id, title, discount_percent, stock, opens_at, closes_at, valid_for)| DefinitionRow {
                        coupon_id,
                        title,
                        discount_percent,
                        stock,
                        opens_at,
                        closes_at,
                        valid_for,
                    })
                    .collect(),
                holders: holders
                    .into_iter()
                    .map(|(coupon_id, user_id, claim_id, code, expires_at)| HolderRow {
                        coupon_id,
                        user_id,
                        claim_id,
                        code,
                        expires_at,
                    })
                    .collect(),
                rejections: rejections
                    .into_iter()
                    .map(|(coupon_id, user_id, claim_id, reason)| RejectionRow { coupon_id, user_id, claim_id, reason })
                    .collect(),
                redemptions: redemptions
                    .into_iter()
                    .map(|(coupon_id, code, order_id)| RedemptionRow { coupon_id, code, order_id })
                    .collect(),
            })
        })
    }

    /// Commits one batch of `partition`: its new rows and the next offset to decide, in one
    /// transaction that first checks `epoch` is still the partition's. [`ClaimCommit::Fenced`]
    /// (nothing written) if another owner took the partition since.
    pub async fn commit_claims(
        &self,
        consumer: &str,
        partition: i32,
        epoch: i64,
        rows: &ClaimRows,
        next_offset: i64,
    ) -> Result<ClaimCommit, StoreError> {
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let fenced = sqlx::query(FENCE)
                .bind(consumer)
                .bind(partition)
                .bind(epoch)
                .bind(next_offset)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 0;
            if fenced {
                tx.rollback().await?;
                return Ok(ClaimCommit::Fenced);
            }
            for chunk in rows.definitions.chunks(ROWS_PER_STATEMENT) {
                let mut q = builder::<Db>(INSERT_DEFINITIONS);
                q.push_values(chunk, |mut r, d| {
                    r.push_bind(d.coupon_id.as_str())
                        .push_bind(partition)
                        .push_bind(d.title.as_str())
                        .push_bind(d.discount_percent)
                        .push_bind(d.stock)
                        .push_bind(d.opens_at)
                        .push_bind(d.closes_at)
                        .push_bind(d.valid_for);
                });
                q.build().execute(&mut *tx).await?;
            }
            Db::write_decided(&mut *tx, partition, &rows.holders, &rows.rejections).await?;
            for chunk in rows.redemptions.chunks(ROWS_PER_STATEMENT) {
                let mut q = builder::<Db>(INSERT_REDEMPTIONS);
                q.push_values(chunk, |mut r, x| {
                    r.push_bind(x.coupon_id.as_str())
                        .push_bind(x.code.as_str())
                        .push_bind(partition)
                        .push_bind(x.order_id.as_str());
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(ClaimCommit::Committed)
        })
    }
}

/// How a backend writes a batch's issued and rejected claims, most of its rows.
trait DecidedRows: Dialect {
    async fn write_decided(
        conn: &mut Self::Connection,
        partition: i32,
        holders: &[HolderRow],
        rejections: &[RejectionRow],
    ) -> Result<(), StoreError>;
}

/// Binary COPY straight into the tables: a batch's 10,000 rows took 65-97 ms as multi-row
/// INSERTs of 2,000 rows (parsing and binding 10,000 parameters per statement).
impl DecidedRows for sqlx::Postgres {
    async fn write_decided(
        conn: &mut sqlx::PgConnection,
        partition: i32,
        holders: &[HolderRow],
        rejections: &[RejectionRow],
    ) -> Result<(), StoreError> {
        if !holders.is_empty() {
            let mut enc = CopyEncoder::with_capacity(holders.len() * 96);
            for h in holders {
                enc.begin_row(6);
                enc.text(&h.coupon_id)?;
                enc.text(&h.user_id)?;
                enc.i32(partition);
                enc.text(&h.claim_id)?;
                enc.text(&h.code)?;
                enc.i64(h.expires_at);
            }
            copy_in(conn, COPY_HOLDERS, enc).await?;
        }
        if !rejections.is_empty() {
            let mut enc = CopyEncoder::with_capacity(rejections.len() * 80);
            for j in rejections {
                enc.begin_row(5);
                enc.text(&j.coupon_id)?;
                enc.text(&j.user_id)?;
                enc.text(&j.claim_id)?;
                enc.i32(partition);
                enc.text(&j.reason)?;
            }
            copy_in(conn, COPY_REJECTIONS, enc).await?;
        }
        Ok(())
    }
}

async fn copy_in(conn: &mut sqlx::PgConnection, statement: &str, enc: CopyEncoder) -> Result<(), StoreError> {
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(enc.finish()).await?;
    copy.finish().await?;
    Ok(())
}

impl DecidedRows for sqlx::Sqlite {
    async fn write_decided(
        conn: &mut sqlx::SqliteConnection,
        partition: i32,
        holders: &[HolderRow],
        rejections: &[RejectionRow],
    ) -> Result<(), StoreError> {
        for chunk in holders.chunks(ROWS_PER_STATEMENT) {
            let mut q = builder::<sqlx::Sqlite>(INSERT_HOLDERS);
            q.push_values(chunk, |mut r, h| {
                r.push_bind(h.coupon_id.as_str())
                    .push_bind(h.user_id.as_str())
                    .push_bind(partition)
                    .push_bind(h.claim_id.as_str())
                    .push_bind(h.code.as_str())
                    .push_bind(h.expires_at);
            });
            q.build().execute(&mut *conn).await?;
        }
        for chunk in rejections.chunks(ROWS_PER_STATEMENT) {
            let mut q = builder::<sqlx::Sqlite>(INSERT_REJECTIONS);
            q.push_values(chunk, |mut r, j| {
                r.push_bind(j.coupon_id.as_str())
                    .push_bind(j.user_id.as_str())
                    .push_bind(j.claim_id.as_str())
                    .push_bind(partition)
                    .push_bind(j.reason.as_str());
            });
            q.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
}

/// A builder holding statement `sql` up to its generated part (the VALUES rows); nothing follows it.
fn builder<'a, Db: Dialect>(sql: &'static str) -> sqlx::QueryBuilder<'a, Db> {
    sqlx::QueryBuilder::new(around_generated(sql).0)
}

#[cfg(test)]
mod tests;
