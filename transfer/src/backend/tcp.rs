//! TCP backend: KV bytes over plain sockets (tokio), for clusters without
//! RDMA and for tests. Same semantics as NIXL: one-sided READ and WRITE of
//! byte ranges of the peer's pool, and notifications delivered after the
//! data has landed.
//!
//! Wire format, one frame per request on a connection (little endian):
//! `"TKV1" op:u8 from:bytes notify:bytes n:u32 n*(offset:u64 len:u64)`, then
//! for WRITE the payload (the ranges' bytes, concatenated). The server answers
//! `status:u8` (0 = ok, then for READ the payload; 1 = refused, then a
//! length-prefixed reason). A READ's notification is sent by the reader as a
//! NOTIFY frame once it holds every byte, so the peer never frees blocks
//! whose bytes are still in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

use super::{check_bounds, wire, Backend, BackendKind, InFlight, Notification, Op};
use crate::error::TransferError;
use crate::memory::HostMemory;
use crate::plan::Desc;

const MAGIC: &[u8; 4] = b"TKV1";
const META_MAGIC: &[u8] = b"TNDMTCP1";
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_NOTIFY: u8 = 3;
const NAME: &str = "tcp";
/// Upper bound on descriptors in one frame: a bad peer cannot make us
/// allocate without limit.
const MAX_DESCS: u32 = 1 << 22;
const MAX_FIELD: u32 = 1 << 16;

#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    len: u64,
}

pub struct TcpBackend {
    name: String,
    mem: Arc<HostMemory>,
    advertise: SocketAddr,
    peers: Mutex<HashMap<String, Peer>>,
    notifications: Arc<Mutex<Vec<Notification>>>,
    rt: Handle,
}

impl TcpBackend {
    /// Binds the data port on `bind` and serves peers' requests on `rt`.
    /// `advertise` is the address peers dial (defaults to the bound one).
    pub async fn start(
        name: &str,
        mem: Arc<HostMemory>,
        bind: SocketAddr,
        advertise: Option<SocketAddr>,
    ) -> Result<TcpBackend, TransferError> {
        let listener = TcpListener::bind(bind).await?;
        let local = listener.local_addr()?;
        let notifications = Arc::new(Mutex::new(Vec::new()));
        let rt = Handle::current();
        rt.spawn(serve(listener, mem.clone(), notifications.clone()));
        Ok(TcpBackend {
            name: name.to_string(),
            mem,
            advertise: advertise.unwrap_or(local),
            peers: Mutex::new(HashMap::new()),
            notifications,
            rt,
        })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.advertise
    }

    fn peer(&self, name: &str) -> Result<Peer, TransferError> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| TransferError::UnknownPeer(name.to_string()))
    }
}

async fn serve(listener: TcpListener, mem: Arc<HostMemory>, notes: Arc<Mutex<Vec<Notification>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mem = mem.clone();
        let notes = notes.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(stream, mem, notes).await {
                tracing::debug!(error = %e, "tcp data connection ended");
            }
        });
    }
}

struct Frame {
    op: u8,
    from: String,
    notify: Vec<u8>,
    ranges: Vec<(u64, u64)>,
}

async fn read_field<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let n = r.read_u32_le().await?;
    if n > MAX_FIELD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "field too long",
        ));
    }
    let mut b = vec![0; n as usize];
    r.read_exact(&mut b).await?;
    Ok(b)
}

async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut magic = [0u8; 4];
    match r.read_exact(&mut magic).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &magic != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad magic",
        ));
    }
    let op = r.read_u8().await?;
    let from = String::from_utf8_lossy(&read_field(r).await?).into_owned();
    let notify = read_field(r).await?;
    let n = r.read_u32_le().await?;
    if n > MAX_DESCS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "too many ranges",
        ));
    }
    let mut ranges = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let off = r.read_u64_le().await?;
        let len = r.read_u64_le().await?;
        ranges.push((off, len));
    }
    Ok(Some(Frame {
        op,
        from,
        notify,
        ranges,
    }))
}

fn ranges_ok(ranges: &[(u64, u64)], mem: &HostMemory) -> Result<(), String> {
    for &(off, len) in ranges {
        if mem.resolve(off, len).is_none() {
            return Err(format!(
                "range {off}+{len} outside the pool of {} bytes{}",
                mem.len(),
                if mem.region_map().is_some() {
                    " or across one of its separately allocated regions"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(())
}

async fn refuse<W: AsyncWriteExt + Unpin>(w: &mut W, reason: &str) -> std::io::Result<()> {
    w.write_u8(1).await?;
    w.write_u32_le(reason.len() as u32).await?;
    w.write_all(reason.as_bytes()).await?;
    w.flush().await
}

async fn serve_conn(
    stream: TcpStream,
    mem: Arc<HostMemory>,
    notes: Arc<Mutex<Vec<Notification>>>,
) -> std::io::Result<()> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(frame) = read_frame(&mut rd).await? {
        if let Err(reason) = ranges_ok(&frame.ranges, &mem) {
            refuse(&mut wr, &reason).await?;
            return Ok(());
        }
        match frame.op {
            OP_READ => {
                wr.write_u8(0).await?;
                for &(off, len) in &frame.ranges {
                    // SAFETY: bounds checked; the reader owns these blocks
                    // for the duration of its transfer.
                    let src = unsafe { mem.slice(off, len) }.expect("checked range");
                    wr.write_all(src).await?;
                }
                wr.flush().await?;
            }
            OP_WRITE => {
                for &(off, len) in &frame.ranges {
                    // SAFETY: bounds checked; the writer owns these blocks.
                    let dst = unsafe { mem.slice_mut(off, len) }.expect("checked range");
                    rd.read_exact(dst).await?;
                }
                wr.write_u8(0).await?;
                wr.flush().await?;
            }
            OP_NOTIFY => {
                wr.write_u8(0).await?;
                wr.flush().await?;
            }
            other => {
                refuse(&mut wr, &format!("unknown op {other}")).await?;
                return Ok(());
            }
        }
        if !frame.notify.is_empty() {
            notes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Notification {
                    from: frame.from,
                    message: frame.notify,
                });
        }
    }
    Ok(())
}

fn put_header(
    out: &mut Vec<u8>,
    op: u8,
    from: &str,
    notify: &[u8],
    ranges: impl ExactSizeIterator<Item = (u64, u64)>,
) {
    out.extend_from_slice(MAGIC);
    out.push(op);
    wire::put_bytes(out, from.as_bytes());
    wire::put_bytes(out, notify);
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (off, len) in ranges {
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
}

async fn read_status<R: AsyncReadExt + Unpin>(r: &mut R, peer: &str) -> Result<(), TransferError> {
    let status = r.read_u8().await.map_err(|e| unreachable_err(peer, e))?;
    if status == 0 {
        return Ok(());
    }
    let reason = read_field(r).await.map_err(|e| unreachable_err(peer, e))?;
    Err(TransferError::PeerRefused {
        peer: peer.to_string(),
        message: String::from_utf8_lossy(&reason).into_owned(),
    })
}

fn unreachable_err(peer: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::PeerUnreachable {
        peer: peer.to_string(),
        message: e.to_string(),
    }
}

async fn run_transfer(
    op: Op,
    from: String,
    peer_name: String,
    peer: Peer,
    mem: Arc<HostMemory>,
    descs: Vec<Desc>,
    notify: Option<Vec<u8>>,
) -> Result<(), TransferError> {
    let stream = TcpStream::connect(peer.addr)
        .await
        .map_err(|e| unreachable_err(&peer_name, e))?;
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let io = |e: std::io::Error| unreachable_err(&peer_name, e);
    let mut header = Vec::with_capacity(32 + descs.len() * 16);
    match op {
        Op::Read => {
            // The peer learns about a READ only when we hold every byte.
            put_header(
                &mut header,
                OP_READ,
                &from,
                &[],
                descs.iter().map(|d| (d.remote, d.len)),
            );
            wr.write_all(&header).await.map_err(io)?;
            wr.flush().await.map_err(io)?;
            read_status(&mut rd, &peer_name).await?;
            for d in &descs {
                // SAFETY: bounds checked before posting; this transfer owns
                // the destination blocks.
                let dst = unsafe { mem.slice_mut(d.local, d.len) }.expect("checked range");
                rd.read_exact(dst).await.map_err(io)?;
            }
            if let Some(msg) = notify {
                header.clear();
                put_header(&mut header, OP_NOTIFY, &from, &msg, std::iter::empty());
                wr.write_all(&header).await.map_err(io)?;
                wr.flush().await.map_err(io)?;
                read_status(&mut rd, &peer_name).await?;
            }
        }
        Op::Write => {
            put_header(
                &mut header,
                OP_WRITE,
                &from,
                notify.as_deref().unwrap_or(&[]),
                descs.iter().map(|d| (d.remote, d.len)),
            );
            wr.write_all(&header).await.map_err(io)?;
            for d in &descs {
                // SAFETY: bounds checked before posting.
                let src = unsafe { mem.slice(d.local, d.len) }.expect("checked range");
                wr.write_all(src).await.map_err(io)?;
            }
            wr.flush().await.map_err(io)?;
            read_status(&mut rd, &peer_name).await?;
        }
    }
    Ok(())
}

struct TcpInFlight {
    rx: mpsc::Receiver<Result<(), TransferError>>,
    done: bool,
}

impl InFlight for TcpInFlight {
    fn poll(&mut self) -> Result<bool, TransferError> {
        if self.done {
            return Ok(true);
        }
        match self.rx.try_recv() {
            Ok(r) => {
                r?;
                self.done = true;
                Ok(true)
            }
            Err(mpsc::TryRecvError::Empty) => Ok(false),
            Err(mpsc::TryRecvError::Disconnected) => {
                Err(TransferError::backend(NAME, "transfer task vanished"))
            }
        }
    }

    fn wait_until(&mut self, deadline: Instant) -> Result<bool, TransferError> {
        if self.done {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(r) => {
                r?;
                self.done = true;
                Ok(true)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(false),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(TransferError::backend(NAME, "transfer task vanished"))
            }
        }
    }
}

impl Backend for TcpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tcp
    }

    fn agent_name(&self) -> &str {
        &self.name
    }

    fn local_metadata(&self) -> Result<Vec<u8>, TransferError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(META_MAGIC);
        wire::put_bytes(&mut out, self.name.as_bytes());
        wire::put_bytes(&mut out, self.advertise.to_string().as_bytes());
        wire::put_u64(&mut out, self.mem.len() as u64);
        Ok(out)
    }

    fn load_peer(&self, metadata: &[u8]) -> Result<String, TransferError> {
        let mut r = wire::Reader::new(metadata);
        r.magic(META_MAGIC)?;
        let name = r.string()?;
        let addr: SocketAddr = r
            .string()?
            .parse()
            .map_err(|e| TransferError::BadMetadata(format!("data address: {e}")))?;
        let len = r.u64()?;
        if name == self.name {
            return Err(TransferError::BadMetadata(
                "that is our own metadata".into(),
            ));
        }
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), Peer { addr, len });
        Ok(name)
    }

    fn forget_peer(&self, peer: &str) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }

    fn post(
        &self,
        op: Op,
        peer: &str,
        descs: &[Desc],
        notify: Option<&[u8]>,
    ) -> Result<Box<dyn InFlight>, TransferError> {
        let p = self.peer(peer)?;
        check_bounds(descs, self.mem.len() as u64, p.len)?;
        // Separately allocated regions: no local range may cross one (the
        // peer checks its own side).
        if self.mem.region_map().is_some() {
            ranges_ok(
                &descs.iter().map(|d| (d.local, d.len)).collect::<Vec<_>>(),
                &self.mem,
            )
            .map_err(TransferError::BadRequest)?;
        }
        let (tx, rx) = mpsc::channel();
        let fut = run_transfer(
            op,
            self.name.clone(),
            peer.to_string(),
            p,
            self.mem.clone(),
            descs.to_vec(),
            notify.map(|m| m.to_vec()),
        );
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        Ok(Box::new(TcpInFlight { rx, done: false }))
    }

    fn notify(&self, peer: &str, message: &[u8]) -> Result<(), TransferError> {
        let p = self.peer(peer)?;
        let from = self.name.clone();
        let peer_name = peer.to_string();
        let msg = message.to_vec();
        let (tx, rx) = mpsc::channel();
        self.rt.spawn(async move {
            let r = async {
                let mut stream = TcpStream::connect(p.addr)
                    .await
                    .map_err(|e| unreachable_err(&peer_name, e))?;
                let mut header = Vec::new();
                put_header(&mut header, OP_NOTIFY, &from, &msg, std::iter::empty());
                stream
                    .write_all(&header)
                    .await
                    .map_err(|e| unreachable_err(&peer_name, e))?;
                read_status(&mut stream, &peer_name).await
            }
            .await;
            let _ = tx.send(r);
        });
        let mut f = TcpInFlight { rx, done: false };
        if f.wait_until(Instant::now() + std::time::Duration::from_secs(10))? {
            Ok(())
        } else {
            Err(unreachable_err(peer, "notification timed out"))
        }
    }

    fn take_notifications(&self) -> Result<Vec<Notification>, TransferError> {
        Ok(std::mem::take(
            &mut *self.notifications.lock().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}
