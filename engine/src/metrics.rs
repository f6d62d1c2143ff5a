//! Prometheus metrics: the recorder and the text exposition served at `/metrics`.

/// The current metrics in Prometheus text format.
pub fn render() -> String {
    String::new()
}
