//! SMTP protocol cores (sans-IO).
pub mod data;
pub mod server;

#[cfg(test)]
mod server_tests;
