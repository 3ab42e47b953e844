//! The guard in front of every route: a `Host` that is not the server's own address and an
//! `Origin` of another site are refused (403, DNS rebinding and cross-site pages), then a
//! request without the server's token (401).
//!
//! The token comes in `Authorization: Bearer TOKEN`. A WebSocket upgrade may carry it instead
//! as the subprotocol `bearer.TOKEN` in `Sec-WebSocket-Protocol` (a browser cannot set headers
//! on a WebSocket); that is looked at only when there is no `Authorization` header and only on
//! an upgrade. Both are compared in constant time.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::ApiState;
use crate::error::{ApiError, ApiResult};

/// The prefix of the subprotocol that carries the token (`bearer.TOKEN`).
pub const BEARER_PROTOCOL: &str = "bearer.";

/// Equality that takes as long whatever the first difference.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses foreign hosts and origins, then requests without the token.
pub(crate) async fn guard(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Err(e) = check(&state, request.headers()) {
        return e.into_response();
    }
    next.run(request).await
}

fn check(state: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).unwrap_or("");
    if !state.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "foreign_host",
            format!("`Host: {host}` is not this server (expected one of {})", state.hosts.join(", ")),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let own =
            origin.strip_prefix("http://").is_some_and(|rest| state.hosts.iter().any(|h| h.eq_ignore_ascii_case(rest)));
        if !own {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "foreign_origin",
                format!("requests from `{origin}` are refused (another site)"),
            ));
        }
    }
    let token = match headers.get(header::AUTHORIZATION) {
        Some(v) => v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or(""),
        None if is_upgrade(headers) => offered_tokens(headers).next().unwrap_or(""),
        None => "",
    };
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs its token: `Authorization: Bearer TOKEN` (`descartes serve --print-token`), or the \
             subprotocol `bearer.TOKEN` on a WebSocket",
        ));
    }
    if !same_secret(token, &state.token) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the token is not this server's"));
    }
    Ok(())
}

/// Whether the request asks for a WebSocket.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")))
}

/// The subprotocols a WebSocket client offers, in order.
fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The tokens offered as `bearer.TOKEN` subprotocols.
fn offered_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    offered_protocols(headers).filter_map(|p| p.strip_prefix(BEARER_PROTOCOL))
}

/// The subprotocol to echo to a WebSocket client: its `bearer.TOKEN` with this server's token,
/// if it offered one (compared in constant time).
pub(crate) fn chosen_protocol(headers: &HeaderMap, token: &str) -> Option<HeaderValue> {
    offered_protocols(headers)
        .find(|p| p.strip_prefix(BEARER_PROTOCOL).is_some_and(|t| same_secret(t, token)))
        .and_then(|p| HeaderValue::from_str(p).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn secrets_and_subprotocols() {
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
        let h = headers(&[("upgrade", "websocket"), ("sec-websocket-protocol", "x, bearer.t0k")]);
        assert!(is_upgrade(&h));
        assert_eq!(offered_tokens(&h).collect::<Vec<_>>(), ["t0k"]);
        assert_eq!(chosen_protocol(&h, "t0k").unwrap(), "bearer.t0k");
        assert_eq!(chosen_protocol(&h, "other"), None);
        assert!(!is_upgrade(&headers(&[("sec-websocket-protocol", "bearer.t0k")])));
    }
}
