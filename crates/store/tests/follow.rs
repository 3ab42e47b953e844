//! The follower (`descartes_core::follow`) over a real store: every matching event once, in
//! order, with its filter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use descartes_core::EventStore;
use descartes_core::follow::{EventFilter, Follower};
use descartes_protocol::{Message, MessageAdded, NewEvent, RunId};
use descartes_store::MemoryEventStore;

#[tokio::test]
async fn hands_out_matching_events_once_in_order() {
    let store = MemoryEventStore::new();
    let (a, b) = (RunId::from("a"), RunId::from("b"));
    let msg = |r: &RunId, i: usize| {
        NewEvent::new(r, MessageAdded { message: Message::user_text(format!("{i}")), model_call_id: None })
    };
    store.append((0..2500).map(|i| msg(if i % 2 == 0 { &a } else { &b }, i)).collect()).await.unwrap();
    let mut all = Follower::new(&store, EventFilter::default(), 0);
    let mut seen = Vec::new();
    loop {
        let page = all.next_page(700).await.unwrap();
        if page.is_empty() {
            break;
        }
        seen.extend(page.iter().map(|e| e.seq));
    }
    assert_eq!(seen, (1..=2500).collect::<Vec<_>>());
    let filter = EventFilter { stream: Some(b.clone()), kinds: vec!["message*".into()] };
    let mut only_b = Follower::new(&store, filter, 0);
    let page = only_b.next_page(5000).await.unwrap();
    assert_eq!(page.len(), 1250, "read on until the limit or the end");
    assert!(page.iter().all(|e| e.run_id == b));
    let rest = only_b.next_page(5000).await.unwrap();
    assert!(rest.is_empty());
    let first =
        Follower::new(&store, EventFilter { stream: Some(b.clone()), kinds: vec![] }, 0).next_page(3).await.unwrap();
    assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 4, 6]);
    let mut none = Follower::new(&store, EventFilter { kinds: vec!["run_completed".into()], ..Default::default() }, 0);
    assert!(none.next(10, Duration::from_millis(10)).await.unwrap().is_empty());
    assert_eq!(none.cursor(), 2500, "what it read is behind it");
}
