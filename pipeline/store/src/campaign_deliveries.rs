//! How many of a campaign's notifications the gateways wrote to streams: each gateway process adds
//! what its streams wrote since its last flush to its own row (campaign, instance); a campaign's
//! delivered count is the sum over instances.

use super::{Dialect, Store, StoreError};

const ADD: &str = include_str!("sql/campaign_deliveries_add.sql");
const SUM: &str = include_str!("sql/campaign_deliveries_sum.sql");

impl Store {
    /// Adds `deltas` (campaign id, notifications written since the last call) to `instance`'s rows,
    /// in one transaction. Deltas rather than totals: a count the gateway forgot (its bounded map
    /// dropped the campaign) and starts again from 0 adds to the row instead of overwriting it.
    pub async fn add_campaign_deliveries(
        &self,
        instance: &str,
        deltas: &[(String, u64)],
        now_micros: i64,
    ) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        // The same order in every writer: no two flushes wait on each other's rows crosswise.
        let mut sorted: Vec<&(String, u64)> = deltas.iter().collect();
        sorted.sort_unstable();
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            for (campaign, delta) in sorted {
                sqlx::query(ADD)
                    .bind(Db::text(campaign))
                    .bind(Db::text(instance))
                    .bind(i64::try_from(*delta).unwrap_or(i64::MAX))
                    .bind(now_micros)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// A campaign's notifications written to streams, summed over every gateway instance.
    pub async fn campaign_delivered(&self, campaign_id: &str) -> Result<u64, StoreError> {
        on_pool!(self, |pool, Db| {
            let n: i64 = sqlx::query_scalar(SUM).bind(Db::text(campaign_id)).fetch_one(pool).await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    on_both_backends!(deltas_add_up_per_instance_and_sum_over_instances);

    async fn deltas_add_up_per_instance_and_sum_over_instances(store: &Store) {
        assert_eq!(store.campaign_delivered("spring").await.unwrap(), 0);
        store.add_campaign_deliveries("gw-a", &[("spring".into(), 3), ("fall".into(), 1)], 10).await.unwrap();
        store.add_campaign_deliveries("gw-a", &[("spring".into(), 2)], 20).await.unwrap();
        store.add_campaign_deliveries("gw-b", &[("spring".into(), 5)], 30).await.unwrap();
        store.add_campaign_deliveries("gw-b", &[], 40).await.unwrap();
        assert_eq!(store.campaign_delivered("spring").await.unwrap(), 10);
        assert_eq!(store.campaign_delivered("fall").await.unwrap(), 1);
        assert_eq!(store.campaign_delivered("winter").await.unwrap(), 0);
    }
}
