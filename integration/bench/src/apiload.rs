//! Sustained load on one REST route for `mm-bench api`: `wrk` (Debian's
//! package; the figures people compare), and a small built-in loop that
//! needs nothing installed and cross-checks wrk's numbers.
//!
//! Both keep their connections open (HTTP/1.1 keep-alive), one request in
//! flight per connection, as many connections as asked, for a fixed time;
//! both report requests per second and latency quantiles over every
//! request. The built-in loop speaks minimal HTTP/1.1 over `TcpStream`
//! itself rather than through an HTTP client library, so the client's own
//! cost stays small and close to wrk's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::report::quantile;

/// One load run's result.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// `wrk` or `builtin`.
    pub tool: String,
    pub duration_s: f64,
    pub threads: u32,
    pub connections: u32,
    pub requests: u64,
    pub requests_per_s: f64,
    pub latency_median_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Answers other than 2xx, plus connect/read/write/timeout errors.
    pub errors: u64,
}

/// `wrk` on the PATH, if installed.
pub fn wrk_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join("wrk")).find(|p| p.is_file())
}

pub fn wrk_version(wrk: &std::path::Path) -> String {
    // `wrk -v` prints its version line and the usage, and exits 1.
    Command::new(wrk)
        .arg("-v")
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_default()
}

/// Runs wrk against `url` with `--latency` and parses its summary.
pub fn wrk(
    wrk: &std::path::Path,
    url: &str,
    token: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> Result<LoadResult> {
    let out = Command::new(wrk)
        .args(["--latency", "-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs()), "--timeout", "10s"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text, threads, connections).with_context(|| format!("parsing wrk's output:\n{text}"))
}

/// `4.80ms`, `950.00us`, `1.20s` → ms.
fn wrk_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e3)
    } else {
        return None;
    };
    // Rounded to the nanosecond, so that `950.00us` is 0.95, not 0.95000000001.
    number.parse::<f64>().ok().map(|v| (v * factor * 1e6).round() / 1e6)
}

fn parse_wrk(text: &str, threads: u32, connections: u32) -> Result<LoadResult> {
    let words = |prefix: &str| -> Option<Vec<&str>> {
        text.lines().map(str::trim).find(|l| l.starts_with(prefix)).map(|l| l.split_whitespace().collect())
    };
    let percentile = |p: &str| words(p).and_then(|w| wrk_ms(w.get(1)?));
    // "  31234 requests in 10.00s, 50.00MB read"
    let summary = text.lines().map(str::trim).find(|l| l.contains(" requests in ")).context("no request count")?;
    let w: Vec<&str> = summary.split_whitespace().collect();
    let requests: u64 = w.first().and_then(|n| n.parse().ok()).context("request count")?;
    let duration_s = w.get(3).and_then(|d| wrk_ms(d.trim_end_matches(','))).context("duration")? / 1e3;
    let rate: f64 = words("Requests/sec:").and_then(|w| w.get(1)?.parse().ok()).context("Requests/sec")?;
    let max = words("Latency ").and_then(|w| wrk_ms(w.get(3)?)).context("latency max")?;
    // "Non-2xx or 3xx responses: N" and "Socket errors: connect 0, read 0, write 0, timeout 0"
    let non_2xx: u64 = words("Non-2xx or 3xx responses:").and_then(|w| w.get(4)?.parse().ok()).unwrap_or(0);
    let socket: u64 = words("Socket errors:")
        .map(|w| w.iter().filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(LoadResult {
        tool: "wrk".into(),
        duration_s,
        threads,
        connections,
        requests,
        requests_per_s: rate,
        latency_median_ms: percentile("50%").context("50% latency (run with --latency)")?,
        latency_p99_ms: percentile("99%").context("99% latency")?,
        latency_max_ms: max,
        errors: non_2xx + socket,
    })
}

/// One keep-alive connection sending `GET path` again and again.
struct Connection {
    reader: BufReader<TcpStream>,
    request: Vec<u8>,
}

impl Connection {
    fn open(addr: SocketAddr, path: &str, token: &str) -> Result<Connection> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
        )
        .into_bytes();
        Ok(Connection { reader: BufReader::new(stream), request })
    }

    /// Sends the request and reads the whole answer; returns its status.
    fn get(&mut self) -> Result<u16> {
        self.reader.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
        let mut length = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed mid-answer");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.context("no Content-Length (chunked answers are not expected here)")?];
        self.reader.read_exact(&mut body)?;
        Ok(status)
    }
}

/// `connections` threads, each one keep-alive connection, for `duration`.
pub fn builtin(addr: SocketAddr, path: &str, token: &str, connections: u32, duration: Duration) -> Result<LoadResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let per_thread: Vec<Result<(Vec<f64>, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|_| {
                scope.spawn(move || -> Result<(Vec<f64>, u64)> {
                    let mut connection = Connection::open(addr, path, token)?;
                    let (mut latencies, mut errors) = (Vec::new(), 0);
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        match connection.get() {
                            Ok(200..=299) => latencies.push(sent.elapsed().as_secs_f64() * 1e3),
                            Ok(_) => errors += 1,
                            Err(_) => {
                                errors += 1;
                                connection = Connection::open(addr, path, token)?;
                            }
                        }
                    }
                    Ok((latencies, errors))
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("load thread panicked")).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let (mut all, mut errors) = (Vec::new(), 0);
    for result in per_thread {
        let (latencies, e) = result?;
        all.extend(latencies);
        errors += e;
    }
    if all.is_empty() {
        bail!("no request succeeded ({errors} errors)");
    }
    all.sort_by(f64::total_cmp);
    Ok(LoadResult {
        tool: "builtin".into(),
        duration_s: (elapsed * 1e3).round() / 1e3,
        threads: connections,
        connections,
        requests: all.len() as u64,
        requests_per_s: all.len() as f64 / elapsed,
        latency_median_ms: quantile(&all, 0.5),
        latency_p99_ms: quantile(&all, 0.99),
        latency_max_ms: *all.last().expect("not empty"),
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:8080/v1/namespaces/bench/machines?page_size=50
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.12ms    2.01ms   1.20s    80.00%
    Req/Sec     1.57k   200.00     2.00k    70.00%
  Latency Distribution
     50%  950.00us
     75%    6.00ms
     90%    7.50ms
     99%   12.00ms
  31234 requests in 10.00s, 50.00MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:   3123.40
Transfer/sec:      5.00MB
";

    #[test]
    fn parses_wrk() {
        let r = parse_wrk(WRK, 2, 16).unwrap();
        assert_eq!((r.requests, r.requests_per_s, r.duration_s), (31234, 3123.4, 10.0));
        assert_eq!((r.latency_median_ms, r.latency_p99_ms, r.latency_max_ms), (0.95, 12.0, 1200.0));
        assert_eq!(r.errors, 6);
        assert!(parse_wrk("garbage", 2, 16).is_err());
    }

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_ms("950.00us"), Some(0.95));
        assert_eq!(wrk_ms("4.80ms"), Some(4.8));
        assert_eq!(wrk_ms("1.50s"), Some(1500.0));
        assert_eq!(wrk_ms("2.00m"), Some(120_000.0));
        assert_eq!(wrk_ms("x"), None);
    }
}
