//! The server side of a SPDY/3.1 session as the kubelet runs it (`moby/spdystream`):
//! every SYN_STREAM gets a SYN_REPLY, PINGs are echoed, DATA is routed to the stream's
//! receiver, FIN half-closes, and the session ends with the connection. One zlib context
//! per direction, primed with the SPDY/3 dictionary (`shared/k8s-wire-reference.md` 7.5).

use std::collections::HashMap;

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::mpsc,
};

use gateway_userspace::proxy::frames::{SpdyDecoder, SpdyFrame, SpdyHeaders, spdy_header};

use crate::spdy_frames::SpdyEncoder;

/// A stream the client opened.
pub(crate) struct IncomingStream {
    /// Stream id.
    pub id: u32,
    /// Its SYN_STREAM headers.
    pub headers: SpdyHeaders,
    /// Its data; closes at the client's FIN (or RST, or the end of the session).
    pub data: mpsc::UnboundedReceiver<Bytes>,
}

impl IncomingStream {
    /// A header by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        spdy_header(&self.headers, name)
    }
}

/// What the session writes.
#[derive(Debug)]
pub(crate) enum Out {
    /// DATA on a stream (`fin` half-closes it).
    Data {
        id: u32,
        bytes: Bytes,
        fin: bool,
    },
    /// Close the connection after everything queued before.
    Close,
    SynReply(u32),
    Ping(u32),
}

/// A running session: streams as the client opens them, and a writer.
pub(crate) struct Session {
    /// Streams in the order the client opened them; closes when the connection ends.
    pub streams: mpsc::UnboundedReceiver<IncomingStream>,
    /// Frames to write, in order.
    pub out: mpsc::UnboundedSender<Out>,
}

impl Session {
    /// Writes data on a stream.
    pub fn data(&self, id: u32, bytes: Bytes) {
        let _ = self.out.send(Out::Data {
            id,
            bytes,
            fin: false,
        });
    }

    /// Half-closes a stream.
    pub fn fin(&self, id: u32) {
        let _ = self.out.send(Out::Data {
            id,
            bytes: Bytes::new(),
            fin: true,
        });
    }

    /// Closes the connection once everything queued is written.
    pub fn close(&self) {
        let _ = self.out.send(Out::Close);
    }
}

/// Starts the reader and writer tasks on `io`.
pub(crate) fn start<IO>(io: IO) -> Session
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (streams_tx, streams_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(write, out_rx));
    tokio::spawn(read_loop(read, out_tx.clone(), streams_tx));
    Session {
        streams: streams_rx,
        out: out_tx,
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Out>) {
    let mut encoder = match SpdyEncoder::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "test API server: SPDY encoder");
            return;
        }
    };
    while let Some(out) = rx.recv().await {
        let bytes = match out {
            Out::Data { id, bytes, fin } => SpdyEncoder::data(id, &bytes, fin),
            Out::Ping(id) => SpdyEncoder::ping(id),
            Out::SynReply(id) => match encoder.syn_reply(id, 0, &[]) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "test API server: SPDY SYN_REPLY");
                    return;
                }
            },
            Out::Close => break,
        };
        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    out: mpsc::UnboundedSender<Out>,
    streams: mpsc::UnboundedSender<IncomingStream>,
) {
    let mut decoder = SpdyDecoder::new();
    let mut open: HashMap<u32, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let frames = match decoder.feed(&buf[..n]) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "test API server: bad SPDY input");
                let _ = out.send(Out::Close);
                return;
            }
        };
        for frame in frames {
            let fin = frame.fin();
            match frame {
                SpdyFrame::SynStream { id, headers, .. } => {
                    let _ = out.send(Out::SynReply(id));
                    let (tx, rx) = mpsc::unbounded_channel();
                    if !fin {
                        open.insert(id, tx);
                    }
                    let _ = streams.send(IncomingStream {
                        id,
                        headers,
                        data: rx,
                    });
                }
                SpdyFrame::Data { id, payload, .. } => {
                    if let Some(tx) = open.get(&id)
                        && !payload.is_empty()
                    {
                        let _ = tx.send(Bytes::from(payload));
                    }
                    if fin {
                        open.remove(&id);
                    }
                }
                SpdyFrame::Headers { id, .. } if fin => {
                    open.remove(&id);
                }
                SpdyFrame::RstStream { id, .. } => {
                    open.remove(&id);
                }
                // Client pings have odd ids; echo them (ours would be even; we send none).
                SpdyFrame::Ping(id) => {
                    let _ = out.send(Out::Ping(id));
                }
                SpdyFrame::GoAway { .. } => return,
                _ => {}
            }
        }
    }
}
