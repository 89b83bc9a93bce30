//! A blocking admin-socket client, for `ccnodectl`, tests and benchmarks.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{Command, Response};

/// Largest response line the client reads.
pub const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("lost the connection to the daemon")]
    Io(#[source] io::Error),
    #[error("the daemon closed the connection without answering")]
    Closed,
    #[error("the daemon's answer is not a valid response")]
    BadResponse(#[source] serde_json::Error),
    #[error("the daemon's answer is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

/// One connection to the admin socket; requests run one at a time.
#[derive(Debug)]
pub struct AdminClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AdminClient {
    pub fn connect(path: &Path, timeout: Duration) -> Result<AdminClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(ClientError::Io)?;
        let writer = stream.try_clone().map_err(ClientError::Io)?;
        Ok(AdminClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a command and waits for its response.
    pub fn call(
        &mut self,
        command: Command,
        reason: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Response, ClientError> {
        self.call_raw(&super::protocol::Request::to_line(command, reason, limit))
    }

    /// Sends raw bytes (a line, or anything else) and reads one response.
    pub fn call_raw(&mut self, bytes: &[u8]) -> Result<Response, ClientError> {
        if let Err(err) = self.writer.write_all(bytes) {
            // The daemon may have answered and closed before reading the
            // request (a refusal sent on accept): that answer is still
            // waiting in our receive buffer and says more than EPIPE does.
            return match self.read_response() {
                Ok(resp) => Ok(resp),
                Err(_) => Err(ClientError::Io(err)),
            };
        }
        self.read_response()
    }

    /// Reads one response line.
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(ClientError::Io)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if n as u64 > MAX_RESPONSE_BYTES {
            return Err(ClientError::TooLarge);
        }
        serde_json::from_slice(&line).map_err(ClientError::BadResponse)
    }
}
