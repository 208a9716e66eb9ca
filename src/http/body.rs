//! The request body limit, enforced before any handler runs, in a way every client can
//! read the answer to.
//!
//! A server that stops reading an oversized body and answers 413 at once closes the
//! connection with unread bytes in its receive buffer; the kernel then resets it, and a
//! client that sends its whole body before reading (Python's urllib, many HTTP/1.1
//! clients) sees "connection reset" instead of the 413. So the body is read here: up to
//! the limit it is kept for the handler; past it the rest is read and dropped (at most
//! [`DRAIN_MAX`] bytes within [`DRAIN_TIME`]) before the 413 problem goes out.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::error::Error;

/// Most bytes of an oversized body read and dropped so the client can read its 413.
const DRAIN_MAX: usize = 16 * 1024 * 1024;
/// Longest the whole body may take to arrive (a slow client is cut off after it).
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The middleware: buffers the body within `max` bytes, or answers 413.
pub async fn limit(max: usize, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    let mut kept: Vec<u8> = Vec::new();
    let mut dropped = 0usize;
    let read = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if dropped == 0 && kept.len() + chunk.len() <= max {
                kept.extend_from_slice(&chunk);
            } else {
                dropped += chunk.len() + std::mem::take(&mut kept).len();
                if dropped > DRAIN_MAX {
                    break;
                }
            }
        }
        Ok::<_, String>(())
    })
    .await;
    let too_large = dropped > 0 || declared.is_some_and(|n| n > max as u64);
    match read {
        Err(_) if !too_large => {
            return Error::BadRequest(format!("the request body did not arrive within {DRAIN_TIME:?}")).into_response()
        }
        Ok(Err(e)) if !too_large => {
            return Error::BadRequest(format!("cannot read the request body: {e}")).into_response()
        }
        _ => {}
    }
    if too_large {
        let mut res = Error::PayloadTooLarge { limit: max }.into_response();
        if dropped > DRAIN_MAX || read.is_err() {
            // Not all of it was read: the connection cannot carry another request.
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        debug_assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        return res;
    }
    next.run(Request::from_parts(parts, Body::from(kept))).await
}
