//! A small client of RabbitMQ's management HTTP API: HTTP/1.1 over a
//! `tokio::net::TcpStream`, basic auth, JSON bodies. Plain `http://` only.

use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use switchyard::settings::percent_decode;

use crate::error::{CliError, CliResult};

/// How long a request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The management API of one broker.
#[derive(Clone)]
pub struct Management {
    host: String,
    port: u16,
    prefix: String,
    authorization: String,
    /// The base URL without credentials, for messages.
    pub display: String,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management").field("url", &self.display).finish()
    }
}

impl Management {
    /// A client of the API at `url` (`http://[user:password@]host[:port][/prefix]`);
    /// the user and password default to `user` / `password`.
    pub fn new(url: &str, user: &str, password: &str) -> CliResult<Self> {
        let bad = |why: &str| {
            CliError::usage(format!(
                "RABBITMQ_MANAGEMENT_URL is not a usable URL ({why}): expected http://[user:password@]host:15672"
            ))
        };
        let rest = url
            .trim()
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is supported"))?;
        // The user information ends at the last '@' (a password may hold one);
        // unencoded '/', '?' or '#' in it would make the URL ambiguous.
        let (creds, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        if creds.is_some_and(|c| c.contains(['/', '?', '#'])) {
            return Err(bad(
                "the user or password holds an unencoded '/', '?' or '#': percent-encode them (%2F, %3F, %23)",
            ));
        }
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let decode =
            |v: &str| percent_decode(v).ok_or_else(|| bad("the user or password is not valid percent-encoding"));
        let (user, password) = match creds {
            Some(c) => match c.split_once(':') {
                Some((u, p)) => (decode(u)?, decode(p)?),
                None => (decode(c)?, String::new()),
            },
            None => (user.to_owned(), password.to_owned()),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
                (h.to_owned(), p.parse::<u16>().map_err(|_| bad("bad port"))?)
            }
            _ => (hostport.to_owned(), 15672),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let shown_host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        Ok(Management {
            display: format!("http://{shown_host}:{port}{path}"),
            host,
            port,
            prefix: path.to_owned(),
            authorization: format!("Basic {token}"),
        })
    }

    /// The API from `RABBITMQ_MANAGEMENT_URL`, else `http://<amqp host>:15672`,
    /// with the AMQP credentials unless the URL names its own.
    pub fn from_settings(settings: &switchyard::Settings) -> CliResult<Self> {
        let ep = settings.endpoint().map_err(CliError::from)?;
        match std::env::var("RABBITMQ_MANAGEMENT_URL") {
            Ok(url) if !url.trim().is_empty() => Management::new(&url, &ep.user, ep.password.expose()),
            _ => {
                let host = if ep.host.contains(':') {
                    format!("[{}]", ep.host)
                } else {
                    ep.host.clone()
                };
                Management::new(&format!("http://{host}:15672"), &ep.user, ep.password.expose())
            }
        }
    }

    /// Sends one request; returns the status and the body.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> CliResult<(u16, Vec<u8>)> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_inner(method, path, body))
            .await
            .map_err(|_| {
                CliError::failure(format!(
                    "the RabbitMQ management API at {} did not answer within {REQUEST_TIMEOUT:?}",
                    self.display
                ))
            })?
    }

    async fn request_inner(&self, method: &str, path: &str, body: Option<&Value>) -> CliResult<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| {
            CliError::usage(format!(
                "cannot reach the RabbitMQ management API at {} ({e}): enable it with `rabbitmq-plugins enable \
                 rabbitmq_management`, or point RABBITMQ_MANAGEMENT_URL at it",
                self.display
            ))
        })?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nAuthorization: {}\r\nAccept: application/json\r\n\
             Connection: close\r\nContent-Length: {}\r\n",
            self.prefix,
            self.host,
            self.port,
            self.authorization,
            payload.len()
        );
        if body.is_some() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        req.push_str(&payload);
        let io = |e: std::io::Error| {
            CliError::failure(format!(
                "talking to the RabbitMQ management API at {}: {e}",
                self.display
            ))
        };
        stream.write_all(req.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        parse_response(&raw).ok_or_else(|| {
            CliError::failure(format!(
                "the server at {} did not answer with HTTP: is it RabbitMQ's management API?",
                self.display
            ))
        })
    }

    fn check(&self, method: &str, path: &str, status: u16, body: &[u8]) -> CliResult<()> {
        match status {
            200..=299 => Ok(()),
            401 | 403 => Err(CliError::usage(format!(
                "the RabbitMQ management API at {} refused the credentials ({status}): use a user with the \
                 management tag, e.g. RABBITMQ_MANAGEMENT_URL=http://user:password@host:15672",
                self.display
            ))),
            404 => Err(CliError::usage(format!(
                "{method} {path}: not found on {} (does the vhost exist?)",
                self.display
            ))),
            _ => {
                let text = String::from_utf8_lossy(body);
                let text: String = text.chars().take(300).collect();
                Err(CliError::failure(format!(
                    "{method} {path} on {} answered {status}: {text}",
                    self.display
                )))
            }
        }
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> CliResult<Value> {
        let (status, body) = self.request("GET", path, None).await?;
        self.check("GET", path, status, &body)?;
        serde_json::from_slice(&body).map_err(|e| {
            CliError::failure(format!(
                "GET {path} on {}: the answer is not JSON ({e}): is it RabbitMQ's management API?",
                self.display
            ))
        })
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json(&self, path: &str, body: &Value) -> CliResult<()> {
        let (status, answer) = self.request("PUT", path, Some(body)).await?;
        self.check("PUT", path, status, &answer)
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> CliResult<()> {
        let (status, answer) = self.request("DELETE", path, None).await?;
        self.check("DELETE", path, status, &answer)
    }
}

/// Splits a raw HTTP/1.1 response into its status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard::settings::percent_encode;

    #[test]
    fn urls_parse_and_never_show_the_password() {
        let m = Management::new("http://u:s%40cret@example.com:1234/api-root/", "g", "g").unwrap();
        assert_eq!(m.display, "http://example.com:1234/api-root");
        assert!(!format!("{m:?}").contains("cret"));
        let token = base64::engine::general_purpose::STANDARD.encode("u:s@cret");
        assert_eq!(m.authorization, format!("Basic {token}"));
        let m = Management::new("http://localhost", "guest", "pw").unwrap();
        assert_eq!(m.display, "http://localhost:15672");
        assert!(Management::new("https://x", "a", "b").is_err());
        assert_eq!(percent_encode("/"), "%2F");
        // A '/' in the password must be encoded: refused, and never shown.
        let e = Management::new("http://admin:12/x@rabbit:15672", "g", "g")
            .unwrap_err()
            .to_string();
        assert!(e.contains("percent-encode") && !e.contains("12/x"), "{e}");
        let m = Management::new("http://admin:12%2Fx@rabbit:15672", "g", "g").unwrap();
        assert_eq!(m.display, "http://rabbit:15672");
        let token = base64::engine::general_purpose::STANDARD.encode("admin:12/x");
        assert_eq!(m.authorization, format!("Basic {token}"));
        // A malformed escape is an error, not a panic (non-ASCII after '%').
        assert!(Management::new("http://u:p%1\u{e9}@host:15672", "g", "g").is_err());
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[]"[..]));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[1,2]"[..]));
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_none());
    }
}
