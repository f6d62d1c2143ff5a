//! Wall-clock and timeout helpers shared by the I/O drivers (the sans-IO cores
//! get the time passed in).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::timer::Timer;

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Races a future against a timer; None when the timer wins.
pub async fn within<T>(dur: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        Timer::new(dur).await;
        None
    })
    .await
}
