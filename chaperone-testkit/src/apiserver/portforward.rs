//! Port-forward as the kubelet does it, except that the "pod network namespace" is the
//! host: remote port P is `127.0.0.1:P`. SPDY (also inside the WebSocket tunnel): the
//! client opens an `error` and a `data` stream per connection with the same `requestid`;
//! WebSocket v4 (`?ports=`): channel 2i carries data for port i, 2i+1 its errors
//! (`shared/k8s-wire-reference.md` 7.6).

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

use super::spdy::{self, IncomingStream, Out};

fn connect_error(port: u16, e: &std::io::Error) -> String {
    format!(
        "error forwarding port {port} to pod: failed to connect to localhost:{port} inside the pod: dial tcp4 127.0.0.1:{port}: {e}"
    )
}

/// Serves port-forward requests on a SPDY session until the client closes it.
pub(crate) async fn serve_spdy<IO>(io: IO)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut session = spdy::start(io);
    let mut pending: HashMap<String, (Option<IncomingStream>, Option<IncomingStream>)> =
        HashMap::new();
    while let Some(stream) = session.streams.recv().await {
        let request = stream.header("requestid").unwrap_or("").to_owned();
        let entry = pending.entry(request.clone()).or_default();
        match stream.header("streamtype") {
            Some("error") => entry.0 = Some(stream),
            Some("data") => entry.1 = Some(stream),
            _ => {
                session.fin(stream.id);
                continue;
            }
        }
        if matches!(pending.get(&request), Some((Some(_), Some(_))))
            && let Some((Some(error), Some(data))) = pending.remove(&request)
        {
            tokio::spawn(forward_spdy(session.out.clone(), error, data));
        }
    }
}

async fn forward_spdy(
    out: mpsc::UnboundedSender<Out>,
    error: IncomingStream,
    data: IncomingStream,
) {
    let port: Option<u16> = data.header("port").and_then(|p| p.parse().ok());
    let fin = |id| {
        let _ = out.send(Out::Data {
            id,
            bytes: Bytes::new(),
            fin: true,
        });
    };
    let Some(port) = port else {
        let _ = out.send(Out::Data {
            id: error.id,
            bytes: Bytes::from("invalid or missing port header"),
            fin: true,
        });
        fin(data.id);
        return;
    };
    let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => t,
        Err(e) => {
            let _ = out.send(Out::Data {
                id: error.id,
                bytes: Bytes::from(connect_error(port, &e)),
                fin: true,
            });
            fin(data.id);
            return;
        }
    };
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let mut client_data = data.data;
    let to_pod = async move {
        while let Some(chunk) = client_data.recv().await {
            if tcp_w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = tcp_w.shutdown().await;
    };
    let data_id = data.id;
    let out_pod = out.clone();
    let from_pod = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match tcp_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = out_pod.send(Out::Data {
                        id: data_id,
                        bytes: Bytes::copy_from_slice(&buf[..n]),
                        fin: false,
                    });
                }
            }
        }
        let _ = out_pod.send(Out::Data {
            id: data_id,
            bytes: Bytes::new(),
            fin: true,
        });
    };
    tokio::join!(to_pod, from_pod);
    fin(error.id);
}

/// Serves the WebSocket v4 port-forward protocol (Python's `portforward()`).
pub(crate) async fn serve_websocket<S>(ws: WebSocketStream<S>, ports: Vec<u16>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut writers: HashMap<u8, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let Ok(data_ch) = u8::try_from(2 * i) else {
            break;
        };
        let error_ch = data_ch + 1;
        let [lo, hi] = port.to_le_bytes();
        let _ = out_tx.send(vec![data_ch, lo, hi]);
        let _ = out_tx.send(vec![error_ch, lo, hi]);
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        writers.insert(data_ch, tx);
        let out = out_tx.clone();
        tokio::spawn(async move {
            let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(t) => t,
                Err(e) => {
                    let mut msg = vec![error_ch];
                    msg.extend_from_slice(connect_error(port, &e).as_bytes());
                    let _ = out.send(msg);
                    return;
                }
            };
            let (mut r, mut w) = tcp.into_split();
            let to_pod = async move {
                while let Some(chunk) = rx.recv().await {
                    if w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            };
            let from_pod = async {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut msg = Vec::with_capacity(n + 1);
                            msg.push(data_ch);
                            msg.extend_from_slice(&buf[..n]);
                            let _ = out.send(msg);
                        }
                    }
                }
            };
            tokio::select! {
                () = to_pod => {}
                () = from_pod => {}
            }
        });
    }
    drop(out_tx);
    loop {
        tokio::select! {
            msg = out_rx.recv() => match msg {
                Some(m) => {
                    if sink.send(Message::Binary(m.into())).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Binary(b))) => {
                    if let Some((&ch, payload)) = b.split_first()
                        && let Some(tx) = writers.get(&ch)
                    {
                        let _ = tx.send(Bytes::copy_from_slice(payload));
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = sink.close().await;
}
