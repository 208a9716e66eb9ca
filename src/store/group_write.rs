//! Group commit for records that must be durable before their caller goes on (a sent
//! email, a webhook delivery attempt).
//!
//! Until such a record commits, a crash makes a retry repeat the effect, so it is
//! written at once. Concurrent callers therefore do not each pay a round trip and a
//! commit (an fsync on PostgreSQL): whoever finds no write running writes every record
//! waiting, in one call, and the records that arrive meanwhile go into the next one. An
//! idle writer writes a record the moment it arrives; a busy one adds no delay, it
//! batches.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

type Waiter<T, R> = (Vec<T>, oneshot::Sender<Result<Vec<R>, String>>);

pub struct GroupWrite<T, R> {
    /// Records waiting for the next write, each caller's with whom to answer.
    pending: Mutex<Vec<Waiter<T, R>>>,
    /// Held by the one write in flight.
    writing: tokio::sync::Mutex<()>,
}

impl<T, R> Default for GroupWrite<T, R> {
    fn default() -> Self {
        GroupWrite { pending: Mutex::new(Vec::new()), writing: tokio::sync::Mutex::new(()) }
    }
}

impl<T, R: Send> GroupWrite<T, R> {
    /// Writes `records` (durably, when this returns `Ok`) together with whatever other
    /// callers submitted meanwhile. `write` gets every waiting record in submission order
    /// and answers one `R` per record, in that order; the caller gets its own records'.
    pub async fn submit<F, Fut>(&self, records: Vec<T>, write: F) -> Result<Vec<R>, String>
    where
        F: FnOnce(Vec<T>) -> Fut,
        Fut: Future<Output = Result<Vec<R>, String>>,
    {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((records, tx));
        {
            let _turn = self.writing.lock().await;
            let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            if !batch.is_empty() {
                let sizes: Vec<usize> = batch.iter().map(|(r, _)| r.len()).collect();
                let mut waiters = Vec::with_capacity(batch.len());
                let mut all = Vec::with_capacity(sizes.iter().sum());
                for (records, waiter) in batch {
                    all.extend(records);
                    waiters.push(waiter);
                }
                let expected = all.len();
                match write(all).await {
                    Ok(results) if results.len() == expected => {
                        let mut results = results.into_iter();
                        for (n, waiter) in sizes.into_iter().zip(waiters) {
                            let _ = waiter.send(Ok(results.by_ref().take(n).collect()));
                        }
                    }
                    Ok(results) => {
                        let e = format!("the write answered {} results for {expected} records", results.len());
                        for waiter in waiters {
                            let _ = waiter.send(Err(e.clone()));
                        }
                    }
                    Err(e) => {
                        for waiter in waiters {
                            let _ = waiter.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
        // Ours was written by us, or by the write before ours.
        rx.await.unwrap_or_else(|_| Err("the write was abandoned".into()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn concurrent_submissions_share_writes_and_each_gets_its_own_results() {
        let group: Arc<GroupWrite<u32, u32>> = Arc::default();
        let writes = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let tasks: Vec<_> = (0..20u32)
            .map(|i| {
                let (group, writes) = (group.clone(), writes.clone());
                tokio::spawn(async move {
                    let mine = vec![i * 10, i * 10 + 1];
                    group
                        .submit(mine, |all| async move {
                            writes.lock().unwrap().push(all.clone());
                            tokio::task::yield_now().await;
                            Ok(all.into_iter().map(|r| r + 1).collect())
                        })
                        .await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let i = i as u32;
            assert_eq!(t.await.unwrap().unwrap(), vec![i * 10 + 1, i * 10 + 2]);
        }
        let writes = writes.lock().unwrap();
        assert_eq!(writes.iter().map(Vec::len).sum::<usize>(), 40, "every record written once");
    }

    #[tokio::test]
    async fn a_failed_write_fails_every_caller_in_it() {
        let group: GroupWrite<u32, ()> = GroupWrite::default();
        let r = group.submit(vec![1, 2], |_| async { Err("disk full".to_string()) }).await;
        assert_eq!(r, Err("disk full".into()));
        let short = group.submit(vec![1, 2], |_| async { Ok(vec![()]) }).await;
        assert!(short.unwrap_err().contains("1 results for 2 records"));
    }
}
