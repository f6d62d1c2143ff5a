//! The management API under `/api/v1`: JSON over HTTP, bearer-token auth (checked
//! by the caller in `admin`).

use super::{AdminState, Request, Response};

/// Channels from the API threads to the cores (queue operations).
#[derive(Default)]
pub struct ApiContext {}

pub fn handle(state: &AdminState, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/api/v1/reload") => match &state.reload {
            Some(reload) => match reload() {
                Ok(summary) => Response::json(200, &serde_json::json!({ "reloaded": summary })),
                Err(why) => Response::json(409, &serde_json::json!({ "error": why })),
            },
            None => Response::error(501, "reload is not available"),
        },
        _ => Response::error(404, "no such API endpoint"),
    }
}
