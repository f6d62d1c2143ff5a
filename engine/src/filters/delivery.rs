//! The delivery stage (issue 14 item 1): the rules, Sieve script and HTTP
//! hooks of the listener that received a message, asked again before each
//! delivery attempt. The shard owner asks (`delivery/stage.rs`); this module
//! says which listeners have such filters and builds the question from the
//! stored envelope. Milters are SMTP-session filters and are not asked here
//! (`MILTER_STAGES`); nothing is modified before delivery, a verdict only.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_policy::sieve::SieveExtras;
use sluice_policy::stage::{ClientFacts, Stage, StageEvent, Verdict};
use sluice_spool::Envelope;

use super::session::FilterSession;
use super::Filters;
use crate::config::Config;

/// The listeners whose filters run before delivery, by listener name. Empty
/// (the usual case) costs the dispatch one atomic load and one length test.
#[derive(Debug, Default)]
pub struct DeliveryFilters {
    by_listener: HashMap<String, Arc<Filters>>,
}

/// Swapped by a reload; read at every dispatch.
pub type DeliveryFiltersSwap = Arc<ArcSwap<DeliveryFilters>>;

impl DeliveryFilters {
    /// From the listeners of a loaded (or reloaded) configuration.
    pub fn of_config(config: &Config) -> DeliveryFilters {
        let by_listener = config
            .server
            .listener
            .iter()
            .filter_map(|(name, l)| {
                let f = l.filters.as_ref().filter(|f| f.at_delivery())?;
                Some((name.clone(), f.clone()))
            })
            .collect();
        DeliveryFilters { by_listener }
    }

    pub fn is_empty(&self) -> bool {
        self.by_listener.is_empty()
    }

    /// The filters of `listener`, if it has any before delivery.
    pub fn get(&self, listener: &str) -> Option<&Arc<Filters>> {
        self.by_listener.get(listener)
    }
}

/// What the client was when the message came in, from its envelope (a notice
/// the relay wrote itself has no client: 0.0.0.0).
fn client_of(envelope: &Envelope, server_name: &str) -> ClientFacts {
    ClientFacts {
        listener: envelope.listener.clone(),
        ip: envelope
            .client_ip
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        port: 0,
        ptr: None,
        helo: Some(envelope.helo.clone()).filter(|h| !h.is_empty()),
        tls: envelope.tls.as_deref().map(|t| match t.split_once(' ') {
            Some((version, cipher)) => (version.to_string(), cipher.to_string()),
            None => (t.to_string(), String::new()),
        }),
        auth_user: envelope.auth_user.clone(),
        server_name: server_name.to_string(),
    }
}

/// Asks `filters` about a stored message: its sender, its recipients still
/// open, and the message as stored. The verdict of the first filter that
/// does not accept, or accept.
pub async fn consult(
    filters: Arc<Filters>,
    queue_id: &str,
    envelope: &Envelope,
    message: &[u8],
    server_name: &str,
) -> Verdict {
    let client = client_of(envelope, server_name);
    let recipients: Vec<String> = envelope
        .recipients
        .iter()
        .filter(|r| crate::delivery::is_open(&r.status))
        .map(|r| r.address.clone())
        .collect();
    let event = StageEvent {
        stage: Stage::Delivery,
        client: &client,
        queue_id: Some(queue_id),
        sender: Some(&envelope.sender),
        sender_params: &[],
        recipient: None,
        recipients: &recipients,
        message: Some(message),
    };
    // No milter is asked at delivery, so the chain opens no connection.
    let mut chain = FilterSession::new(filters, None);
    chain.run(&event, &SieveExtras::default()).await.verdict
}
