//! The metrics endpoint: a minimal HTTP/1.x responder on its own thread (`ftvm-metrics`).
//!
//! It serves one connection at a time, reads at most [`MAX_REQUEST`] bytes of request head,
//! and gives each connection at most [`CONNECTION_DEADLINE`] in all, so no client can hold
//! the thread longer than that, make it allocate without bound, or grow the process's
//! threads; nothing here touches the channel thread (the exposition is read from atomics).
//! A general HTTP server crate was not used: tiny_http, for one, starts a thread per
//! concurrent connection, which is the exhaustion this endpoint must not allow.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The most request-head bytes read from one connection.
pub const MAX_REQUEST: usize = 8 << 10;
/// The most time one connection gets, reading and writing.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(2);

/// The content type of the OpenMetrics text `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `render()` at `GET /metrics` on `listener` from a new thread, until the process
/// ends.
pub fn spawn(
    listener: TcpListener,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ftvm-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &render) {
                            tracing::debug!("metrics endpoint: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::debug!("metrics endpoint: cannot accept: {e}");
                        // A full file table, say: do not spin.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    let deadline = Instant::now() + CONNECTION_DEADLINE;
    let head = read_head(&mut stream, deadline)?;
    let request_line = head.lines().next().unwrap_or("");
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, render()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "ftvm: the metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "ftvm: GET /metrics\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.set_write_timeout(Some(left(deadline)?))?;
    stream.write_all(response.as_bytes())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// The time left until `deadline` (an error once it passed).
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took too long",
        ));
    }
    Ok(d)
}

/// Reads until the blank line that ends the request head, within `deadline` and
/// [`MAX_REQUEST`] bytes.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() >= MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(listener, || "ftvm_up 1\n# EOF\n".to_string()).unwrap();
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nftvm_up 1\n# EOF\n"), "{ok}");
        let missing = get(addr, "GET / HTTP/1.0\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // A client that never finishes its request does not keep the next one out for
        // longer than the deadline; one that sends too much is cut off.
        let _silent = TcpStream::connect(addr).unwrap();
        let mut flood = TcpStream::connect(addr).unwrap();
        let _ = flood.write_all(&vec![b'a'; MAX_REQUEST * 2]);
        let ok = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    }
}
