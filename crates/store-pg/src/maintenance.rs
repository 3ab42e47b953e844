//! Keeping the task table healthy on servers that do not vacuum it.
//!
//! Every task row is rewritten several times in its life (claim, start, complete, ...), and
//! none of those updates can be HOT (they change indexed columns: `status`, the lease), so each
//! leaves a dead row version and dead index entries behind. PostgreSQL's autovacuum removes
//! them (it is on by default); without it, claims wade through ever more dead entries of the
//! queue index and throughput falls tenfold within minutes. So when a store finds autovacuum
//! off (for the server, or for the `tasks` table), it vacuums the task tables itself: a thread
//! with its own connection runs `VACUUM` on them every [`VACUUM_EVERY`] while task operations
//! are being made (and `ANALYZE` every few rounds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use postgres::Client;

use crate::conn::{Conn, PgOptions, Target};

/// How often the store vacuums the task tables when the server does not.
pub(crate) const VACUUM_EVERY: Duration = Duration::from_secs(15);
/// Every how many vacuums the statistics are refreshed too.
const ANALYZE_EVERY: u32 = 8;

/// Whether autovacuum looks after the `tasks` table.
pub(crate) fn autovacuum_on(client: &mut Client) -> Result<bool, postgres::Error> {
    let row = client.query_one(
        "SELECT current_setting('autovacuum')::bool
            AND current_setting('track_counts')::bool
            AND NOT coalesce((SELECT 'autovacuum_enabled=false' = ANY(reloptions) FROM pg_class
                              WHERE oid = 'tasks'::regclass), false)",
        &[],
    )?;
    row.try_get(0)
}

/// The vacuuming thread's loop: vacuums after every period in which task operations ran, until
/// `stop` is closed.
pub(crate) fn run(target: Target, options: PgOptions, ops: Arc<AtomicU64>, stop: Receiver<()>) {
    let mut conn: Option<Conn> = None;
    let mut seen = ops.load(Ordering::Relaxed);
    let mut round = 0u32;
    loop {
        match stop.recv_timeout(VACUUM_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = ops.load(Ordering::Relaxed);
        if now == seen {
            continue;
        }
        seen = now;
        round += 1;
        let c = match conn.take() {
            Some(c) if !c.client.is_closed() => c,
            _ => match Conn::open(&target, &options) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %target.error(&e), "cannot connect to vacuum the task tables");
                    continue;
                }
            },
        };
        let mut c = c;
        let sql =
            if round % ANALYZE_EVERY == 1 { "VACUUM (ANALYZE) tasks, event_seq" } else { "VACUUM tasks, event_seq" };
        let started = std::time::Instant::now();
        match c.client.batch_execute(sql) {
            Ok(()) => tracing::debug!(took = ?started.elapsed(), "{sql}"),
            Err(e) => tracing::warn!(error = %target.error(&e), "vacuuming the task tables failed"),
        }
        conn = Some(c);
    }
}
