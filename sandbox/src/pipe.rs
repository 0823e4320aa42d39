//! A capped in-memory stdout/stderr that stops the guest when it overflows.
//!
//! wasmtime-wasi's `MemoryOutputPipe` reports a full pipe as a closed stream, which guests may
//! ignore (QuickJS's `console.log` does, and then loops until the timeout). This pipe keeps the
//! first `capacity` bytes and traps on the first write past them, so the run ends at once and
//! is reported as `output_limit`.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::{
    cli::{IsTerminal, StdoutStream},
    p2::{OutputStream, Pollable, StreamError, StreamResult},
};

/// Raised (as a trap) when a guest writes past the cap.
#[derive(Debug, thiserror::Error)]
#[error("output exceeded its cap")]
pub(crate) struct OutputOverflow;

#[derive(Debug, Clone)]
pub(crate) struct CappedPipe {
    capacity: usize,
    buffer: Arc<Mutex<BytesMut>>,
}

impl CappedPipe {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            buffer: Arc::new(Mutex::new(BytesMut::new())),
        }
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        self.buffer.lock().map(|b| b.to_vec()).unwrap_or_default()
    }

    /// Appends what fits; `false` when some of `bytes` did not.
    fn push(&self, bytes: &[u8]) -> bool {
        let Ok(mut buf) = self.buffer.lock() else {
            return false;
        };
        let room = self.capacity.saturating_sub(buf.len());
        let n = room.min(bytes.len());
        buf.extend_from_slice(&bytes[..n]);
        n == bytes.len()
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        if self.push(&bytes) {
            Ok(())
        } else {
            Err(StreamError::Trap(OutputOverflow.into()))
        }
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always accept a write: the one that crosses the cap traps in `write`.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.push(buf) {
            Poll::Ready(Ok(buf.len()))
        } else {
            Poll::Ready(Err(io::Error::other(OutputOverflow)))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}
