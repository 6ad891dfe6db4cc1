//! gRPC control plane (tonic): the `KvAgent` service over an [`Agent`], the
//! client helpers peers use, and conversions between proto and crate types.
//! Bytes never travel here; only metadata, requests and progress.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use crate::agent::{Agent, PeerMetadata, TransferSpec};
use crate::backend::{BackendKind, Op};
use crate::error::TransferError;
use crate::layout::KvLayout;
use crate::plan::PlanKind;

pub mod proto {
    tonic::include_proto!("tandem.kv.v1");
}

use proto::kv_agent_client::KvAgentClient;
use proto::kv_agent_server::{KvAgent, KvAgentServer};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a control-plane call may take (metadata, a notification): a peer
/// that accepts and never answers must not hold a caller for ever.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `host:port` or a URL to a tonic endpoint.
pub fn endpoint(target: &str) -> Result<Endpoint, TransferError> {
    let uri = if target.contains("://") {
        target.to_string()
    } else {
        format!("http://{target}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| TransferError::BadRequest(format!("bad peer address {target:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true))
}

pub async fn connect(target: &str) -> Result<KvAgentClient<Channel>, TransferError> {
    let channel =
        endpoint(target)?
            .connect()
            .await
            .map_err(|e| TransferError::PeerUnreachable {
                peer: target.to_string(),
                message: format!("control plane: {e}"),
            })?;
    Ok(KvAgentClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Fetches a peer's metadata over its control plane.
pub async fn fetch_metadata(target: &str) -> Result<PeerMetadata, TransferError> {
    let mut client = connect(target).await?;
    let md = client
        .get_metadata(proto::MetadataRequest {})
        .await
        .map_err(|s| TransferError::PeerUnreachable {
            peer: target.to_string(),
            message: s.message().to_string(),
        })?
        .into_inner();
    PeerMetadata::try_from(md)
}

impl From<&KvLayout> for proto::Layout {
    fn from(l: &KvLayout) -> Self {
        let p = l.params();
        proto::Layout {
            model: p.shape.name.clone(),
            num_regions: l.num_regions(),
            num_blocks: l.num_blocks(),
            block_len: l.block_len(),
            block_size: l.block_size(),
            tp_rank: p.tp_rank,
            tp_size: p.tp_size,
            format: p.format.to_string(),
            regions: format!("{:?}", p.regions).to_lowercase(),
            memory: p.mem.to_string(),
            json: serde_json::to_string(l).unwrap_or_default(),
        }
    }
}

impl From<&PeerMetadata> for proto::AgentMetadata {
    fn from(m: &PeerMetadata) -> Self {
        proto::AgentMetadata {
            agent_name: m.agent_name.clone(),
            engine_id: m.engine_id.clone(),
            instance_id: m.instance_id.clone(),
            backend: m
                .offers
                .first()
                .map(|o| o.0.to_string())
                .unwrap_or_default(),
            layout: Some((&m.layout).into()),
            backend_metadata: m.offers.first().map(|o| o.1.clone()).unwrap_or_default(),
            offers: m
                .offers
                .iter()
                .map(|(kind, md)| proto::BackendOffer {
                    backend: kind.to_string(),
                    metadata: md.clone(),
                })
                .collect(),
            separate_regions: m.separate_regions,
        }
    }
}

impl TryFrom<proto::AgentMetadata> for PeerMetadata {
    type Error = TransferError;
    fn try_from(m: proto::AgentMetadata) -> Result<Self, Self::Error> {
        let bad = |s: String| TransferError::BadMetadata(s);
        if m.agent_name.is_empty() || m.instance_id.is_empty() {
            return Err(bad("agent_name and instance_id are required".into()));
        }
        // Agents before `offers` sent one backend in fields 4 and 6.
        let offers: Vec<(BackendKind, Vec<u8>)> = if m.offers.is_empty() {
            vec![(m.backend.parse().map_err(bad)?, m.backend_metadata)]
        } else {
            m.offers
                .into_iter()
                .map(|o| Ok((o.backend.parse::<BackendKind>().map_err(bad)?, o.metadata)))
                .collect::<Result<_, TransferError>>()?
        };
        let layout = m.layout.ok_or_else(|| bad("layout missing".into()))?;
        let parsed: KvLayout =
            serde_json::from_str(&layout.json).map_err(|e| bad(format!("layout: {e}")))?;
        // The summary fields must agree with the full layout: a peer that
        // disagrees with itself is not one to write memory for.
        if parsed.num_blocks() != layout.num_blocks
            || parsed.block_len() != layout.block_len
            || parsed.num_regions() != layout.num_regions
        {
            return Err(bad(format!(
                "layout summary ({} regions x {} blocks x {} B) contradicts the layout ({} x {} x {} B)",
                layout.num_regions,
                layout.num_blocks,
                layout.block_len,
                parsed.num_regions(),
                parsed.num_blocks(),
                parsed.block_len()
            )));
        }
        Ok(PeerMetadata {
            agent_name: m.agent_name,
            engine_id: m.engine_id,
            instance_id: m.instance_id,
            layout: parsed,
            offers,
            separate_regions: m.separate_regions,
        })
    }
}

/// The service over one agent.
pub struct Service {
    agent: Arc<Agent>,
}

impl Service {
    pub fn new(agent: Arc<Agent>) -> Self {
        Service { agent }
    }

    fn spec(&self, op: Op, r: proto::TransferRequest) -> Result<TransferSpec, Status> {
        if r.peer.is_empty() {
            return Err(Status::invalid_argument("peer is required"));
        }
        let plan = match proto::Plan::try_from(r.plan) {
            Ok(proto::Plan::Naive) => PlanKind::Naive,
            Ok(proto::Plan::Coalesced) => PlanKind::Coalesced,
            Ok(proto::Plan::Blocks) => PlanKind::Blocks,
            Err(_) => return Err(Status::invalid_argument(format!("unknown plan {}", r.plan))),
        };
        Ok(TransferSpec {
            request_id: r.request_id,
            peer: r.peer,
            op,
            local_blocks: r.local_block_ids,
            remote_blocks: r.remote_block_ids,
            plan,
            timeout: (r.deadline_ms > 0).then(|| Duration::from_millis(r.deadline_ms)),
            notify: (!r.remote_request_id.is_empty())
                .then(|| (r.remote_request_id, r.tp_size.max(1))),
            remote_instance_id: (!r.remote_instance_id.is_empty()).then_some(r.remote_instance_id),
        })
    }

    fn run(
        &self,
        spec: TransferSpec,
    ) -> UnboundedReceiverStream<Result<proto::TransferEvent, Status>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let agent = self.agent.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let result = agent
                .transfer(spec, move |p| {
                    let _ = progress_tx.send(Ok(proto::TransferEvent {
                        event: Some(proto::transfer_event::Event::Progress(
                            proto::TransferProgress {
                                bytes_done: p.bytes_done,
                                bytes_total: p.bytes_total,
                                descriptors_done: p.descs_done,
                                descriptors_total: p.descs_total,
                            },
                        )),
                    }));
                })
                .await;
            let event = match result {
                Ok(done) => Ok(proto::TransferEvent {
                    event: Some(proto::transfer_event::Event::Done(proto::TransferDone {
                        bytes: done.bytes,
                        descriptors: done.descriptors,
                        elapsed_us: done.elapsed.as_micros() as u64,
                        gbps: done.gbps(),
                        rehandshake: done.rehandshake,
                        backend: done.backend.to_string(),
                        device_us: done.device_time.map_or(0, |d| d.as_micros() as u64),
                    })),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(event);
        });
        UnboundedReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl KvAgent for Service {
    async fn get_metadata(
        &self,
        _: Request<proto::MetadataRequest>,
    ) -> Result<Response<proto::AgentMetadata>, Status> {
        let md = self.agent.metadata()?;
        Ok(Response::new((&md).into()))
    }

    type PullStream = UnboundedReceiverStream<Result<proto::TransferEvent, Status>>;
    type PushStream = UnboundedReceiverStream<Result<proto::TransferEvent, Status>>;

    async fn pull(
        &self,
        req: Request<proto::TransferRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let spec = self.spec(Op::Read, req.into_inner())?;
        Ok(Response::new(self.run(spec)))
    }

    async fn push(
        &self,
        req: Request<proto::TransferRequest>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let spec = self.spec(Op::Write, req.into_inner())?;
        Ok(Response::new(self.run(spec)))
    }

    async fn notify(
        &self,
        req: Request<proto::NotifyRequest>,
    ) -> Result<Response<proto::NotifyResponse>, Status> {
        let r = req.into_inner();
        if r.peer.is_empty() || r.message.is_empty() {
            return Err(Status::invalid_argument("peer and message are required"));
        }
        self.agent.notify(&r.peer, &r.message).await?;
        Ok(Response::new(proto::NotifyResponse {}))
    }

    async fn hold(
        &self,
        req: Request<proto::HoldRequest>,
    ) -> Result<Response<proto::HoldResponse>, Status> {
        let r = req.into_inner();
        let timeout = (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms));
        let left = self.agent.hold(&r.request_id, r.block_ids, timeout)?;
        Ok(Response::new(proto::HoldResponse {
            expires_in_ms: left.as_millis() as u64,
        }))
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let r = req.into_inner();
        let blocks = self.agent.release(&r.request_id);
        Ok(Response::new(proto::ReleaseResponse {
            released: blocks.is_some(),
            blocks: blocks.map(|b| b.len() as u32).unwrap_or(0),
        }))
    }

    async fn health(
        &self,
        _: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let (requests, blocks) = self.agent.held();
        let s = &self.agent.stats;
        Ok(Response::new(proto::HealthResponse {
            agent_name: self.agent.name().to_string(),
            instance_id: self.agent.instance_id().to_string(),
            backend: self.agent.backend_kind().to_string(),
            held_requests: requests as u32,
            held_blocks: blocks as u32,
            released_by_notification: s.released_by_notification.load(Relaxed),
            released_by_request: s.released_by_request.load(Relaxed),
            expired: s.expired.load(Relaxed),
            notifications_received: s.notifications_received.load(Relaxed),
            handshakes: s.handshakes.load(Relaxed),
            transfers_ok: s.transfers_ok.load(Relaxed),
            transfers_failed: s.transfers_failed.load(Relaxed),
            bytes_moved: s.bytes_moved.load(Relaxed),
        }))
    }
}

/// Serves the control plane on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<Agent>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), TransferError> {
    let svc = KvAgentServer::new(Service::new(agent)).max_decoding_message_size(64 << 20);
    // The builder's tcp_nodelay covers only listeners tonic binds itself; on
    // a listener passed in, accepted connections need it set here. Without
    // it an answer's frames wait on the client's delayed ACK (Nagle): a
    // metadata fetch took ~45 ms on loopback, most of a first pull.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| TransferError::backend("grpc", e))
}
