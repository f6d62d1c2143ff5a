//! SMTP protocol cores (sans-IO): the server session, the DATA/BDAT decoders and
//! the client session used for delivery.
pub mod address;
pub mod body_out;
pub mod client;
pub mod data;
pub mod hygiene;
pub mod requiretls;
pub mod server;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod server_tests;
