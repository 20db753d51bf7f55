//! The metrics listener: HTTP/1.x `GET /metrics` and nothing else.
//!
//! Deliberately tiny rather than a web framework: one request per
//! connection, headers read up to [`MAX_REQUEST`] bytes within
//! [`READ_TIMEOUT`], no body accepted, the connection closed after the
//! answer. It runs as tasks on the broker's own LocalSet (the registry is
//! `Rc`), and everything a scrape waits for runs on blocking threads under
//! the scrape's deadline, so the broker's loop is never held. Scrapes are
//! served one at a time (a second waits for the first): a scraper cannot
//! multiply the threads a scrape starts.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::BrokerMetrics;
use super::gather::{SCRAPE_TIMEOUT, gather};
use crate::registry::Registry;

/// The largest request head accepted.
pub const MAX_REQUEST: usize = 4096;
/// How long a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Judges a request head (`GET /metrics HTTP/1.1`, query ignored).
pub fn route(head: &[u8]) -> Route {
    let Ok(head) = std::str::from_utf8(head) else { return Route::BadRequest };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// Accepts until the broker ends.
pub async fn serve(listener: TcpListener, registry: Rc<Registry>, metrics: Rc<BrokerMetrics>, host: String) {
    let open = Rc::new(Cell::new(0usize));
    let scraping = Rc::new(tokio::sync::Mutex::new(()));
    let host: Rc<str> = host.into();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.get() >= MAX_CONNECTIONS {
            continue;
        }
        open.set(open.get() + 1);
        let (open, scraping, registry, metrics, host) =
            (Rc::clone(&open), Rc::clone(&scraping), Rc::clone(&registry), Rc::clone(&metrics), Rc::clone(&host));
        tokio::task::spawn_local(async move {
            if let Err(e) = answer(stream, &scraping, &registry, &metrics, &host).await {
                tracing::debug!("metrics connection: {e}");
            }
            open.set(open.get() - 1);
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    scraping: &tokio::sync::Mutex<()>,
    registry: &Rc<Registry>,
    metrics: &BrokerMetrics,
    host: &str,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return reply(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return reply(&mut stream, "408 Request Timeout", "text/plain", "").await,
    };
    match route(&head) {
        Route::Metrics => {
            let _one_at_a_time = scraping.lock().await;
            let snapshot = gather(registry, host, SCRAPE_TIMEOUT).await;
            let text = metrics.render(snapshot);
            reply(&mut stream, "200 OK", CONTENT_TYPE, &text).await
        }
        Route::MethodNotAllowed => reply(&mut stream, "405 Method Not Allowed", "text/plain", "GET only\n").await,
        Route::NotFound => reply(&mut stream, "404 Not Found", "text/plain", "only /metrics\n").await,
        Route::BadRequest => reply(&mut stream, "400 Bad Request", "text/plain", "").await,
    }
}

/// The request head, or None when it outgrows [`MAX_REQUEST`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
}

async fn reply(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
