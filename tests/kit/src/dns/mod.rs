//! The resolver under test: a glommio executor on the test thread ([`rt`]) and a
//! scripted DNS server that answers with whatever bytes a test wants ([`script`]).

pub mod rt;
pub mod script;
