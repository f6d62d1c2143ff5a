//! SMTP protocol cores (sans-IO).
pub mod data;
pub mod server;
