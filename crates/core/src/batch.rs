//! The batching rule of the stores' event writers (SQLite and PostgreSQL): which appends one
//! commit carries, and how long it waits for more to share it.
//!
//! Waiting pays only when there is someone to wait for: deferred appends wait (up to
//! [`DEFERRED_FLUSH`]) for a durable one to ride with; under concurrency a commit waits (up to
//! [`COALESCE`]) for as many appenders as the last one carried, so they share one flush. A lone
//! sequential appender never waits.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Longest time a deferred append waits before it is written on its own.
pub const DEFERRED_FLUSH: Duration = Duration::from_millis(2);
/// Longest time a commit waits for concurrent appenders to join it.
pub const COALESCE: Duration = Duration::from_micros(300);
/// Largest number of appends written in one transaction.
pub const MAX_BATCH: usize = 4096;

/// Gathers the batches of a group commit from a channel (see the module docs).
#[derive(Debug, Clone)]
pub struct Batcher {
    /// How many durable appends the last batch carried: the concurrency expected again.
    last: usize,
    coalesce: Duration,
    deferred_flush: Duration,
}

impl Default for Batcher {
    fn default() -> Self {
        Batcher::new(COALESCE, DEFERRED_FLUSH)
    }
}

impl Batcher {
    /// A batcher with other waits than [`COALESCE`] and [`DEFERRED_FLUSH`].
    pub fn new(coalesce: Duration, deferred_flush: Duration) -> Self {
        Batcher { last: 1, coalesce, deferred_flush }
    }

    /// Waits for the next command and adds it, with the batch it starts, to `queue` (at most
    /// [`MAX_BATCH`] in all). `is_deferred` tells the appends that need not be durable at once.
    /// Returns false, adding nothing, once every sender is gone.
    pub fn gather<T>(&mut self, rx: &Receiver<T>, queue: &mut Vec<T>, is_deferred: impl Fn(&T) -> bool) -> bool {
        match rx.recv() {
            Ok(cmd) => queue.push(cmd),
            Err(_) => return false,
        }
        let first = Instant::now();
        while queue.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => queue.push(cmd),
                Err(_) => break,
            }
        }
        let all_deferred = |q: &[T]| q.iter().all(&is_deferred);
        let deadline = if all_deferred(queue) {
            Some(first + self.deferred_flush)
        } else if self.last > 1 && queue.len() < self.last {
            Some(first + self.coalesce)
        } else {
            None
        };
        if let Some(deadline) = deadline {
            while queue.len() < MAX_BATCH {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match rx.recv_timeout(deadline - now) {
                    Ok(cmd) => {
                        queue.push(cmd);
                        if !all_deferred(queue) && (self.last <= 1 || queue.len() >= self.last) {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        self.last = queue.iter().filter(|c| !is_deferred(c)).count().max(1);
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    /// `true`: a deferred append.
    fn deferred(c: &bool) -> bool {
        *c
    }

    const LONG: Duration = Duration::from_secs(10);

    fn send_later(tx: &std::sync::mpsc::Sender<bool>, after: Duration, cmds: &[bool]) -> std::thread::JoinHandle<()> {
        let (tx, cmds) = (tx.clone(), cmds.to_vec());
        std::thread::spawn(move || {
            std::thread::sleep(after);
            for c in cmds {
                let _ = tx.send(c);
            }
        })
    }

    #[test]
    fn a_lone_append_does_not_wait_for_others() {
        let (tx, rx) = channel();
        let mut b = Batcher::new(LONG, LONG);
        tx.send(false).unwrap();
        let later = send_later(&tx, Duration::from_millis(100), &[false]);
        let mut queue = Vec::new();
        assert!(b.gather(&rx, &mut queue, deferred));
        assert_eq!(queue, [false], "a lone durable append is written alone");
        later.join().unwrap();
    }

    #[test]
    fn deferred_appends_wait_for_a_durable_one_and_no_longer() {
        let (tx, rx) = channel();
        let mut b = Batcher::new(LONG, LONG);
        tx.send(true).unwrap();
        let later = send_later(&tx, Duration::from_millis(20), &[false]);
        let (mut queue, start) = (Vec::new(), Instant::now());
        assert!(b.gather(&rx, &mut queue, deferred));
        assert_eq!(queue, [true, false]);
        assert!(start.elapsed() < LONG, "stopped waiting when the durable append came");
        later.join().unwrap();
    }

    #[test]
    fn deferred_appends_alone_are_written_after_the_deferred_wait() {
        let (tx, rx) = channel();
        let mut b = Batcher::new(LONG, Duration::from_millis(20));
        tx.send(true).unwrap();
        let mut queue = Vec::new();
        assert!(b.gather(&rx, &mut queue, deferred));
        assert_eq!(queue, [true]);
    }

    #[test]
    fn under_concurrency_a_commit_waits_for_as_many_as_the_last_one_carried() {
        let (tx, rx) = channel();
        let mut b = Batcher::new(LONG, LONG);
        for _ in 0..3 {
            tx.send(false).unwrap();
        }
        let mut queue = Vec::new();
        assert!(b.gather(&rx, &mut queue, deferred));
        assert_eq!(queue.len(), 3, "three queued appends, one batch");
        queue.clear();
        tx.send(false).unwrap();
        let later = send_later(&tx, Duration::from_millis(20), &[false, false, false]);
        let start = Instant::now();
        assert!(b.gather(&rx, &mut queue, deferred));
        assert!(queue.len() >= 3, "waited for the other two appenders: {queue:?}");
        assert!(start.elapsed() < LONG, "stopped waiting once three were there");
        later.join().unwrap();
    }

    #[test]
    fn a_closed_channel_ends_the_loop() {
        let (tx, rx) = channel::<bool>();
        drop(tx);
        let mut queue = Vec::new();
        assert!(!Batcher::default().gather(&rx, &mut queue, deferred));
        assert!(queue.is_empty());
    }
}
