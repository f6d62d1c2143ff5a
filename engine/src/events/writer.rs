//! The events thread: takes events from the cores in batches, writes the
//! file and the durable buffer.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_spool::EventStore;

use super::file::FileSink;
use super::webhook::{Endpoint, Poster};
use super::{Emitter, Event, Msg, EMITTER};
use crate::config::events::EventsSection;

/// Events taken from the channel per batch, at most.
const MAX_BATCH: usize = 4096;
/// How long a batch collects events after its first: one commit (and fsync)
/// and one file write for all of them, instead of one per event. 100 ms, not
/// 20: the buffer's fsyncs share the disk with the spool's group commits, and
/// at 50 a second they slowed pipelined relaying by 10–15% (BENCHMARKS.md).
const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// Starts the events thread (and the webhook poster) and installs the
/// emitter. `tls`: the verifying client config for https:// webhooks.
pub fn start(
    cfg: &EventsSection,
    spool_path: &Path,
    sync: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<()> {
    let store = Arc::new(
        EventStore::open(spool_path, sync && cfg.sync, cfg.map_size.0 as usize)
            .context("opening the events buffer (<spool.path>/events)")?,
    );
    let file = match &cfg.file {
        Some(p) => Some(
            FileSink::open(p, cfg.file_max_size.0, cfg.file_keep)
                .with_context(|| format!("events.file: opening {}", p.display()))?,
        ),
        None => None,
    };
    let poster = match &cfg.webhook_url {
        Some(url) => {
            let endpoint =
                Endpoint::parse(url).map_err(|e| anyhow::anyhow!("events.webhook_url: {e}"))?;
            let poster = Poster {
                store: store.clone(),
                endpoint,
                batch_size: cfg.webhook_batch_size,
                max_delay: cfg.webhook_max_delay.0,
                timeout: cfg.webhook_timeout.0,
                retry_initial: cfg.webhook_retry_initial.0,
                retry_max: cfg.webhook_retry_max.0,
                tls,
            };
            let handle = std::thread::Builder::new()
                .name("sluice-events-post".into())
                .spawn(move || poster.run())
                .context("starting the events poster thread")?;
            Some(handle.thread().clone())
        }
        None => None,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(cfg.channel_capacity);
    let writer = Writer {
        store,
        file,
        poster,
        max_buffered: cfg.max_buffered,
        batch_size: cfg.webhook_batch_size as u64,
        text: Vec::new(),
    };
    std::thread::Builder::new()
        .name("sluice-events".into())
        .spawn(move || writer.run(rx))
        .context("starting the events thread")?;
    let _ = EMITTER.set(Emitter {
        tx,
        tenant_header: cfg.tenant_header.clone(),
        campaign_header: cfg.campaign_header.clone(),
    });
    Ok(())
}

struct Writer {
    store: Arc<EventStore>,
    file: Option<FileSink>,
    /// The poster, woken when a full batch is buffered.
    poster: Option<std::thread::Thread>,
    max_buffered: u64,
    batch_size: u64,
    /// The batch's JSON, kept between batches so its allocation is reused.
    text: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => batch.push(m),
                Err(RecvTimeoutError::Timeout) => {
                    // Idle: events the webhook took are deleted by an empty batch.
                    if self.store.has_unpurged() {
                        self.write(&mut batch);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Collect the rest of the batch by sleeping through the window and
            // then draining, not by blocking on the channel: a receiver blocked
            // in recv is woken by every send, which cost a futex wake on the
            // core and a context switch here per event (most of what events
            // cost on pipelined connections). A flush waits one window at most.
            if !matches!(batch.last(), Some(Msg::Flush(_))) {
                std::thread::sleep(BATCH_WINDOW);
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.write(&mut batch);
        }
    }

    fn write(&mut self, batch: &mut Vec<Msg>) {
        // Sorted out first, so a storage error cannot keep anything in `batch`.
        let mut flushes = Vec::new();
        let mut events: Vec<Box<Event>> = Vec::with_capacity(batch.len());
        for msg in batch.drain(..) {
            match msg {
                Msg::Flush(tx) => flushes.push(tx),
                Msg::Event(e) => events.push(e),
            }
        }
        // Every event's JSON, back to back in one buffer; `ends[i]` is where
        // event i's ends.
        let mut text: Vec<u8> = std::mem::take(&mut self.text);
        text.clear();
        let mut ends: Vec<usize> = Vec::with_capacity(events.len());
        let mut pending = 0u64;
        let mut buffered = 0usize;
        let mut full = 0usize;
        let done = (|| -> Result<(), sluice_spool::SpoolError> {
            // Without a webhook the buffer is never written: no transaction.
            let mut txn = match self.poster {
                Some(_) => {
                    let mut txn = self.store.batch()?;
                    txn.purge_acknowledged()?;
                    pending = txn.pending_len()?;
                    Some(txn)
                }
                None => None,
            };
            for event in &events {
                let start = text.len();
                event.write_json(&mut text);
                if let Some(txn) = txn.as_mut() {
                    if pending >= self.max_buffered {
                        full += 1;
                    } else {
                        txn.push_pending(&text[start..])?;
                        pending += 1;
                        buffered += 1;
                    }
                }
                ends.push(text.len());
            }
            txn.map_or(Ok(()), |t| t.commit())
        })();
        if let Err(e) = done {
            // The file still gets the events; the webhook loses this batch.
            tracing::error!(target: "sluice::events", error = %e, events = events.len(), "event buffer write failed");
            if self.poster.is_some() {
                crate::metrics::events_dropped_n("storage", events.len());
            }
            buffered = 0;
            full = 0;
            text.clear();
            ends.clear();
            for e in &events {
                e.write_json(&mut text);
                ends.push(text.len());
            }
        }
        if full > 0 {
            crate::metrics::events_dropped_n("buffer_full", full);
            tracing::warn!(target: "sluice::events", dropped = full, "event buffer full (events.max_buffered): events dropped for the webhook");
        }
        if buffered > 0 {
            crate::metrics::events_written("buffer", buffered);
            crate::metrics::events_buffered(pending);
        }
        if let Some(f) = self.file.as_mut() {
            let mut start = 0;
            let written = ends
                .iter()
                .try_for_each(|&end| {
                    let line = &text[start..end];
                    start = end;
                    f.write_line(line)
                })
                .and_then(|()| f.flush());
            match written {
                Ok(()) => crate::metrics::events_written("file", ends.len()),
                Err(e) => {
                    crate::metrics::events_dropped_n("file_error", ends.len());
                    tracing::error!(target: "sluice::events", error = %e, "events file write failed");
                }
            }
        }
        if let Some(p) = &self.poster {
            if pending >= self.batch_size {
                p.unpark();
            }
        }
        for tx in flushes {
            let _ = tx.try_send(());
        }
        self.text = text;
    }
}
