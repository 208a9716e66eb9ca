//! The `EventBus` conformance suite: the same functions run against the embedded SQLite
//! bus and RabbitMQ (when `AMQP_URL` is set, as in CI).

use std::sync::Arc;
use std::time::Duration;

use eventra::bus::{BusConfig, BusMessage, Consumer, Delivery, EventBus};

/// A bus with `config` on a fresh backend; the guard cleans up after the test.
type Make = fn(BusConfig) -> futures::future::BoxFuture<'static, (Box<dyn std::any::Any + Send>, Arc<dyn EventBus>)>;

fn config() -> BusConfig {
    // Visibility (the embedded bus's stand-in for a closed channel) well above QUIET.
    BusConfig { max_deliveries: 3, visibility: Duration::from_millis(1500) }
}

fn msg(id: &str) -> BusMessage {
    BusMessage { id: id.into(), routing_key: "user.created".into(), body: format!("{{\"id\":\"{id}\"}}").into_bytes() }
}

/// Long enough for a delivery that is there; the bus answers as soon as it is.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more comes" is given to show itself.
const QUIET: Duration = Duration::from_millis(300);

async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    c.next(WAIT).await.unwrap().expect("a delivery")
}

pub async fn publishes_with_confirm_and_delivers_in_order(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("a"), msg("b"), msg("c")]).await.unwrap();
    let mut c = bus.consume("t", 10).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let d = next(&mut c).await;
        assert_eq!(d.delivery_count, 1);
        assert_eq!(d.message.routing_key, "user.created");
        assert_eq!(d.message.body, format!("{{\"id\":\"{}\"}}", d.message.id).into_bytes());
        ids.push(d.message.id.clone());
        c.ack(&d).await.unwrap();
    }
    assert_eq!(ids, ["a", "b", "c"]);
    assert!(c.next(QUIET).await.unwrap().is_none(), "acked messages are gone");
    assert!(bus.parked(10).await.unwrap().is_empty());
}

pub async fn prefetch_bounds_unsettled_deliveries(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("p1"), msg("p2"), msg("p3")]).await.unwrap();
    let mut c = bus.consume("t", 2).await.unwrap();
    let first = next(&mut c).await;
    let _second = next(&mut c).await;
    assert!(c.next(QUIET).await.unwrap().is_none(), "no third delivery while two are unsettled");
    c.ack(&first).await.unwrap();
    assert_eq!(next(&mut c).await.message.id, "p3");
}

/// A batch taken by a task that died before handing it on (its `next_batch` future
/// dropped mid-way) is still the subscription's to settle: `unsettled` lists every
/// delivery received and not settled, in order, and settling empties it.
pub async fn received_deliveries_stay_listed_until_settled(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("u1"), msg("u2"), msg("u3")]).await.unwrap();
    let mut c = bus.consume("t", 10).await.unwrap();
    let mut taken = Vec::new();
    while taken.len() < 3 {
        taken.extend(c.next_batch(10, WAIT).await.unwrap());
    }
    drop(taken); // the hand that took them is gone
    let orphans = c.unsettled();
    let ids: Vec<&str> = orphans.iter().map(|d| d.message.id.as_str()).collect();
    assert_eq!(ids, ["u1", "u2", "u3"]);
    c.ack_many(&orphans).await.unwrap();
    assert!(c.unsettled().is_empty());
    assert!(c.next(QUIET).await.unwrap().is_none(), "settled from the list: nothing comes back");
}

pub async fn requeued_messages_come_back_counted_then_park_at_the_limit(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("poison")]).await.unwrap();
    let mut c = bus.consume("t", 1).await.unwrap();
    for n in 1..=3 {
        let d = next(&mut c).await;
        assert_eq!((d.message.id.as_str(), d.delivery_count), ("poison", n));
        c.requeue(&d).await.unwrap();
    }
    assert!(c.next(QUIET).await.unwrap().is_none(), "three deliveries, then the DLQ");
    let parked = wait_parked(&bus, 1).await;
    assert_eq!(parked[0].message, msg("poison"));
    assert_eq!((parked[0].reason.as_str(), parked[0].delivery_count), ("delivery limit reached", 3));
}

pub async fn invalid_messages_park_at_once_with_their_reason(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("bad"), msg("good")]).await.unwrap();
    let mut c = bus.consume("t", 10).await.unwrap();
    let bad = next(&mut c).await;
    c.park(&bad, "not a CloudEvent: missing `specversion`").await.unwrap();
    let good = next(&mut c).await;
    assert_eq!(good.message.id, "good");
    c.ack(&good).await.unwrap();
    let parked = wait_parked(&bus, 1).await;
    assert_eq!(parked[0].message, msg("bad"));
    assert_eq!((parked[0].reason.as_str(), parked[0].delivery_count), ("not a CloudEvent: missing `specversion`", 1));
    assert!(c.next(QUIET).await.unwrap().is_none(), "parked, not redelivered");
    // Listing leaves it parked, however often an operator looks.
    for _ in 0..25 {
        let again = bus.parked(10).await.unwrap();
        assert_eq!((again.len(), again[0].delivery_count), (1, 1));
    }

    // Replay puts it back on the bus, once.
    assert!(bus.replay("bad").await.unwrap());
    assert!(!bus.replay("bad").await.unwrap(), "nothing left to replay");
    let again = next(&mut c).await;
    assert_eq!(again.message, msg("bad"));
    c.ack(&again).await.unwrap();
    assert!(bus.parked(10).await.unwrap().is_empty());
}

pub async fn a_vanished_consumers_deliveries_go_to_another(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("orphan")]).await.unwrap();
    let mut dying = bus.consume("dying", 1).await.unwrap();
    let d = next(&mut dying).await;
    assert_eq!(d.delivery_count, 1);
    drop(dying);
    let mut heir = bus.consume("heir", 1).await.unwrap();
    let again = next(&mut heir).await;
    assert_eq!((again.message.id.as_str(), again.delivery_count), ("orphan", 2));
    heir.ack(&again).await.unwrap();
}

pub async fn settling_twice_is_refused(make: Make) {
    let (_g, bus) = make(config()).await;
    bus.publish(&[msg("once")]).await.unwrap();
    let mut c = bus.consume("t", 1).await.unwrap();
    let d = next(&mut c).await;
    c.ack(&d).await.unwrap();
    assert!(c.ack(&d).await.is_err());
    assert!(c.requeue(&d).await.is_err());
}

async fn wait_parked(bus: &Arc<dyn EventBus>, n: usize) -> Vec<eventra::bus::Parked> {
    crate::utils::wait_for("parked messages", WAIT, || {
        let bus = bus.clone();
        async move { Some(bus.parked(10).await.unwrap()).filter(|p| p.len() == n) }
    })
    .await
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;

            fn make(config: BusConfig) -> futures::future::BoxFuture<'static, (Box<dyn std::any::Any + Send>, Arc<dyn EventBus>)> {
                Box::pin(async move {
                    let db = crate::utils::TestDb::sqlite();
                    let store = eventra::store::SqliteStore::connect(db.url(), 4).await.expect("sqlite");
                    eventra::store::Store::migrate(&store).await.expect("migrate");
                    let bus: Arc<dyn EventBus> = Arc::new(eventra::bus::SqliteBus::new(store.pools(), config));
                    (Box::new(db) as Box<dyn std::any::Any + Send>, bus)
                })
            }

            $( #[tokio::test] async fn $name() { super::$name(make).await; } )*
        }

        mod rabbitmq {
            use super::*;

            /// Deletes the test's queues and exchanges when the test ends.
            struct Topology(Arc<eventra::bus::RabbitBus>);

            impl Drop for Topology {
                fn drop(&mut self) {
                    let bus = self.0.clone();
                    let _ = std::thread::spawn(move || {
                        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                        rt.block_on(async { let _ = bus.delete_topology().await; });
                    })
                    .join();
                }
            }

            fn make(config: BusConfig) -> futures::future::BoxFuture<'static, (Box<dyn std::any::Any + Send>, Arc<dyn EventBus>)> {
                Box::pin(async move {
                    let url = std::env::var("AMQP_URL").expect("checked by the test");
                    let ns = format!("eventra-test-{}", uuid::Uuid::now_v7().simple());
                    let bus = Arc::new(eventra::bus::RabbitBus::connect(&url, &ns, config).await.expect("connect to AMQP_URL"));
                    (Box::new(Topology(bus.clone())) as Box<dyn std::any::Any + Send>, bus as Arc<dyn EventBus>)
                })
            }

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::utils::service_url("AMQP_URL", concat!("bus_conformance::rabbitmq::", stringify!($name))).is_none() {
                        return;
                    }
                    super::$name(make).await;
                }
            )*
        }
    };
}

conformance!(
    publishes_with_confirm_and_delivers_in_order,
    prefetch_bounds_unsettled_deliveries,
    requeued_messages_come_back_counted_then_park_at_the_limit,
    invalid_messages_park_at_once_with_their_reason,
    a_vanished_consumers_deliveries_go_to_another,
    settling_twice_is_refused,
    received_deliveries_stay_listed_until_settled,
);

/// The broker drops the bus's connections (`rabbitmqctl close_connection`): the bus
/// reconnects, declares its topology again and goes on publishing; a new consumer gets
/// what was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_bus_reconnects_after_the_broker_drops_it() {
    let Some(url) =
        crate::utils::service_url("AMQP_URL", "bus_conformance::rabbitmq_bus_reconnects_after_the_broker_drops_it")
    else {
        return;
    };
    let ns = format!("eventra-test-{}", uuid::Uuid::now_v7().simple());
    let bus = Arc::new(eventra::bus::RabbitBus::connect(&url, &ns, config()).await.unwrap());
    bus.publish(&[msg("before")]).await.unwrap();
    // Cut this test's connections only (others run in parallel on the same broker).
    let cut = crate::utils::close_rabbitmq_connections(&ns);
    assert!(cut >= 1, "found no connection named after {ns}");
    // Publishing may fail while the drop is noticed; it must succeed again soon.
    crate::utils::wait_for("a publish after the cut", WAIT, || {
        let bus = bus.clone();
        async move { bus.publish(&[msg("after")]).await.ok() }
    })
    .await;
    let mut c = bus.consume("t", 10).await.unwrap();
    let mut ids = Vec::new();
    while let Some(d) = c.next(QUIET).await.unwrap() {
        ids.push(d.message.id.clone());
        c.ack(&d).await.unwrap();
    }
    assert_eq!(ids.first().map(String::as_str), Some("before"), "{ids:?}");
    assert!(ids.iter().any(|i| i == "after"), "{ids:?}");
    drop(c);
    bus.delete_topology().await.unwrap();
}
