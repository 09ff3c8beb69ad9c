//! What the contract tests' local HTTP server (answering as the Kubernetes API server)
//! records of each request: shared by `kubernetes_contract.rs` and
//! `kubernetes_rollouts_contract.rs`, which each answer requests their own way.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    /// The body as JSON; text that is not JSON as a JSON string; `null` when empty.
    pub body: Value,
}

impl Exchange {
    /// Reads the whole request.
    pub async fn read(request: Request<Incoming>) -> Exchange {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
        };
        Exchange {
            method,
            path,
            query,
            content_type,
            body,
        }
    }
}
