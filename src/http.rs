//! The HTTP endpoints: `/metrics` (Prometheus text format), `/healthz` (the process is up) and
//! `/readyz` (accepting clients: not while everything is paused, shutting down, or no upstream
//! is reachable).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::app::App;

/// Serves HTTP on `listener` until the process stops accepting.
pub async fn serve(listener: Arc<TcpListener>, app: Arc<App>) {
    let mut state = app.accept.subscribe();
    loop {
        // A shutdown keeps answering (/readyz says 503); a takeover lets the other process
        // answer, and this one exits when done.
        while *state.borrow_and_update() == crate::app::Accept::Paused {
            if state.changed().await.is_err() {
                return;
            }
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = state.changed() => continue,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, app.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    app: Arc<App>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body): (StatusCode, &str, Bytes) = match req.uri().path() {
        "/metrics" => {
            for pool in app.pools.all() {
                pool.refresh_gauges();
            }
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(app.metrics.render()),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" => {
            if app.is_ready() {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from_static(b"not ready\n"),
                )
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    };
    let resp = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("static response parts are valid");
    Ok(resp)
}
