//! Publishing service ports (`portBindings: {"HOST": "CONTAINER"}`) on the host's loopback.
//!
//! Owns: the host listeners on 127.0.0.1, a userspace TCP forwarder per binding, and the
//! "connector" thread that creates upstream sockets inside the stage namespace.
//! Does not own: the namespace ([`crate::netns`]) or anything about which step a port
//! belongs to beyond its id for messages.
//!
//! Design (runtime-lab §7, "in-process setns proxy"): no veth, iptables, `route_localnet` or
//! helper process, so it also works rootless. A socket belongs to the network namespace of
//! the thread that *created* it, whichever thread uses it later. One long-lived std thread per
//! stage enters the namespace once and, on request over a channel, creates unconnected
//! non-blocking TCP sockets; the tokio side connects them (non-blocking, so a service with a
//! full backlog never stalls the connector) and splices both directions with
//! `copy_bidirectional`. `setns` never runs on a tokio thread, since those are reused.
//!
//! Every host port is bound in [`Forwarders::bind`], before any service starts, so a taken
//! port is reported up front with the step that wanted it. Only TCP is forwarded: UDP would
//! need per-peer session tracking and expiry, and Harness service ports are TCP in practice.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::netns::{NetError, NetNs, enter_current_thread};

/// How long one upstream connect may take. A loopback connect answers at once (accepted or
/// refused); this only bounds a service whose accept backlog is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (EMFILE and the like) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Name of the per-stage connector thread.
const CONNECTOR_THREAD: &str = "stagehand-nscon";

/// One published port: host 127.0.0.1:`host_port` → 127.0.0.1:`target_port` of the stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBinding {
    /// Port on the host's 127.0.0.1. 0 picks a free port (see [`Forwarders::ports`]).
    pub host_port: u16,
    /// Port the service listens on inside the stage namespace. Never 0.
    pub target_port: u16,
    /// The step that publishes the port, for messages.
    pub owner: String,
}

/// The port forwarders of one stage: bound by [`Forwarders::bind`], serving after
/// [`Forwarders::start`], stopped by [`Forwarders::close`]. Dropping it inside the runtime
/// stops the forwarders too (without waiting for them).
#[derive(Debug)]
pub struct Forwarders {
    /// Bound but not yet serving.
    pending: Vec<(PortBinding, std::net::TcpListener)>,
    /// Every bound host port, in binding order (0 resolved to the real port).
    ports: Vec<u16>,
    /// One accept loop per serving listener.
    tasks: Vec<JoinHandle<()>>,
    /// Dropping it (or sending) tells every accept loop to stop.
    shutdown: watch::Sender<()>,
    connector: Option<Connector>,
}

impl Forwarders {
    /// Binds 127.0.0.1:`host_port` for every binding now, so that a taken port fails the
    /// stage before any service starts. Nothing is accepted until [`Forwarders::start`]
    /// (the kernel queues early connections in the backlog).
    pub fn bind(bindings: &[PortBinding]) -> Result<Forwarders, NetError> {
        let mut owners: HashMap<u16, &str> = HashMap::new();
        let mut pending = Vec::with_capacity(bindings.len());
        let mut ports = Vec::with_capacity(bindings.len());
        for binding in bindings {
            if binding.target_port == 0 {
                return Err(NetError::ZeroTargetPort {
                    host_port: binding.host_port,
                    owner: binding.owner.clone(),
                });
            }
            if binding.host_port != 0
                && let Some(first) = owners.insert(binding.host_port, &binding.owner)
            {
                return Err(NetError::DuplicatePort {
                    port: binding.host_port,
                    first: first.to_owned(),
                    second: binding.owner.clone(),
                });
            }
            // std sets SO_REUSEADDR, so a port in TIME_WAIT from a previous run is not "in use".
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, binding.host_port))
                .map_err(|source| bind_error(binding, source))?;
            let port = listener
                .local_addr()
                .map_err(|source| bind_error(binding, source))?
                .port();
            ports.push(port);
            pending.push((binding.clone(), listener));
        }
        let (shutdown, _) = watch::channel(());
        Ok(Forwarders {
            pending,
            ports,
            tasks: Vec::new(),
            shutdown,
            connector: None,
        })
    }

    /// Starts forwarding. Must be called inside a tokio runtime.
    ///
    /// `Some(ns)`: connections go to 127.0.0.1:`target_port` inside `ns`, through the
    /// connector thread (started here; it blocks this call only while it enters `ns`).
    /// `None` (host network): connections go to 127.0.0.1:`target_port` of the host. When
    /// `host_port == target_port` there is nothing to forward: the service binds that very
    /// port itself, so the listener is closed here to free it (`bind` still checked it was free).
    ///
    /// Calling it again starts nothing new.
    pub fn start(&mut self, ns: Option<&NetNs>) -> Result<(), NetError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(NetError::NoRuntime);
        }
        if ns.is_none() {
            self.pending.retain(|(binding, _)| {
                let same = binding.host_port == binding.target_port;
                if same {
                    tracing::debug!(
                        port = binding.host_port,
                        owner = %binding.owner,
                        "host network: service binds the published port itself"
                    );
                }
                !same
            });
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let upstream = match ns {
            None => Upstream::Host,
            Some(ns) => {
                let connector = Connector::spawn(ns)?;
                let requests = connector.requests.clone();
                self.connector = Some(connector);
                Upstream::Netns(requests)
            }
        };
        for (binding, listener) in std::mem::take(&mut self.pending) {
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .map_err(|source| bind_error(&binding, source))?;
            let span = tracing::info_span!(
                "forward",
                port = binding.host_port,
                target = binding.target_port,
                owner = %binding.owner
            );
            let task = serve(
                listener,
                binding.target_port,
                upstream.clone(),
                self.shutdown.subscribe(),
            );
            self.tasks.push(tokio::spawn(task.instrument(span)));
        }
        Ok(())
    }

    /// The bound host ports, in binding order (including ones released by a host-network
    /// `start` because the service binds them itself).
    pub fn ports(&self) -> Vec<u16> {
        self.ports.clone()
    }

    /// Stops accepting, drops every open connection, releases the ports, and stops the
    /// connector thread. When it returns the host ports can be bound again.
    pub async fn close(self) {
        let Forwarders {
            pending,
            tasks,
            shutdown,
            connector,
            ..
        } = self;
        drop(pending);
        drop(shutdown);
        for task in tasks {
            // A forwarder task never panics on purpose; a panic was already reported by tokio.
            let _ = task.await;
        }
        if let Some(connector) = connector {
            connector.stop().await;
        }
    }
}

fn bind_error(binding: &PortBinding, source: io::Error) -> NetError {
    if source.kind() == io::ErrorKind::AddrInUse {
        NetError::PortInUse {
            port: binding.host_port,
            owner: binding.owner.clone(),
        }
    } else {
        NetError::Listen {
            port: binding.host_port,
            owner: binding.owner.clone(),
            source,
        }
    }
}

/// A request to the connector: where to send a fresh socket created inside the namespace.
type SocketRequest = oneshot::Sender<io::Result<TcpSocket>>;

/// Where upstream connections are made.
#[derive(Clone)]
enum Upstream {
    /// The host's own network namespace (host-network stages).
    Host,
    /// The stage namespace, through the connector thread.
    Netns(mpsc::Sender<SocketRequest>),
}

impl Upstream {
    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = match self {
            Upstream::Host => TcpSocket::new_v4()?,
            Upstream::Netns(requests) => {
                let (reply, answer) = oneshot::channel();
                let gone = || io::Error::other("the netns connector thread is gone");
                requests.send(reply).map_err(|_| gone())?;
                answer.await.map_err(|_| gone())??
            }
        };
        socket.connect(addr).await
    }
}

/// The per-stage std thread that lives in the stage namespace and creates sockets there.
#[derive(Debug)]
struct Connector {
    requests: mpsc::Sender<SocketRequest>,
    thread: std::thread::JoinHandle<()>,
}

impl Connector {
    /// Starts the thread and waits until it entered `ns` (or failed to).
    fn spawn(ns: &NetNs) -> Result<Connector, NetError> {
        let fd = ns.fd()?;
        let path = ns.path().to_owned();
        let (requests, incoming) = mpsc::channel::<SocketRequest>();
        let (entered_tx, entered) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(CONNECTOR_THREAD.into())
            .spawn(move || {
                let result = enter_current_thread(fd, &path);
                let ok = result.is_ok();
                let _ = entered_tx.send(result);
                if !ok {
                    return;
                }
                // Ends when every sender is gone: the forwarders closed or were dropped.
                // socket(2) does not block, so one thread serves all connections.
                for reply in incoming {
                    let _ = reply.send(TcpSocket::new_v4());
                }
            })
            .map_err(|source| NetError::Thread {
                name: CONNECTOR_THREAD,
                source,
            })?;
        match entered.recv() {
            Ok(Ok(())) => Ok(Connector { requests, thread }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(NetError::ThreadDied {
                name: CONNECTOR_THREAD,
            }),
        }
    }

    /// Closes the request channel and joins the thread (off the async workers).
    async fn stop(self) {
        drop(self.requests);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// The accept loop of one published port. On shutdown it closes the listener, then aborts
/// and awaits every connection of this port, so both sockets of each are closed on return.
async fn serve(
    listener: TcpListener,
    target_port: u16,
    upstream: Upstream,
    mut shutdown: watch::Receiver<()>,
) {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, target_port));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // Err when the sender is dropped, Ok when signalled: both mean stop.
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let upstream = upstream.clone();
                    connections.spawn(
                        forward_one(client, target, upstream)
                            .instrument(tracing::debug_span!("conn", %peer)),
                    );
                }
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Forwards one accepted connection until both directions are done.
async fn forward_one(mut client: TcpStream, target: SocketAddr, upstream: Upstream) {
    let mut server = match tokio::time::timeout(CONNECT_TIMEOUT, upstream.connect(target)).await {
        Ok(Ok(server)) => server,
        Ok(Err(err)) => {
            // Typically "connection refused": the service is not listening (yet). The client
            // sees its connection closed, as it would without a forwarder.
            tracing::debug!(error = %err, "upstream connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!("upstream connect timed out");
            return;
        }
    };
    // Interactive protocols (databases, redis) suffer from Nagle on a relay.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::run_in;
    use crate::netns::tests::{NsGuard, mounts_under};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn binding(host_port: u16, target_port: u16, owner: &str) -> PortBinding {
        PortBinding {
            host_port,
            target_port,
            owner: owner.to_owned(),
        }
    }

    /// An echo server on `listener` (wherever it was created), on plain std threads.
    fn spawn_echo(listener: std::net::TcpListener) {
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut reader = conn.try_clone().unwrap();
                    let _ = std::io::copy(&mut reader, &mut conn);
                });
            }
        });
    }

    /// Sends `len` bytes derived from `seed` through 127.0.0.1:`port` and checks the echo.
    async fn round_trip(port: u16, seed: u8, len: usize) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(len);
        rd.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len(), "echo length for seed {seed}");
        assert!(got == data, "echo content for seed {seed}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_concurrent_connections_into_the_namespace() {
        let guard = NsGuard::new();
        let inside = run_in(guard.ns(), || {
            std::net::TcpListener::bind("127.0.0.1:0").unwrap()
        })
        .unwrap();
        let target = inside.local_addr().unwrap().port();
        spawn_echo(inside);

        let mut fwd = Forwarders::bind(&[binding(0, target, "Background_1")]).unwrap();
        let host_port = fwd.ports()[0];
        assert_ne!(host_port, 0);
        fwd.start(Some(guard.ns())).unwrap();

        let mut clients = JoinSet::new();
        for seed in 1..=8u8 {
            clients.spawn(round_trip(host_port, seed, 256 * 1024));
        }
        while let Some(done) = clients.join_next().await {
            done.unwrap();
        }

        // A connection left open is cut by close(), and the port is free afterwards.
        let mut open = TcpStream::connect((Ipv4Addr::LOCALHOST, host_port))
            .await
            .unwrap();
        open.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        open.read_exact(&mut byte).await.unwrap();
        fwd.close().await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
            .await
            .expect("close() ends open connections");
        assert!(closed.is_err() || rest.is_empty());
        // The listener is closed when close() returns; under load the kernel may take a
        // moment to finish tearing down the cut connections on that port, so allow it a
        // short grace rather than race it.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, host_port)) {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("close() releases the host port: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn connection_to_a_closed_service_port_is_closed() {
        let guard = NsGuard::new();
        // Nothing listens on the target inside the namespace.
        let mut fwd = Forwarders::bind(&[binding(0, 1, "Background_1")]).unwrap();
        fwd.start(Some(guard.ns())).unwrap();
        let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, fwd.ports()[0]))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
            .await
            .expect("the forwarder closes the client connection");
        assert!(read.is_err() || rest.is_empty());
        fwd.close().await;
        drop(guard);
    }

    #[test]
    fn taken_port_is_reported_with_port_and_step() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = Forwarders::bind(&[binding(port, 80, "Background_1")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("port {port} for Background_1 is already in use on 127.0.0.1")
        );
    }

    #[test]
    fn duplicate_and_zero_ports_are_rejected() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let err =
            Forwarders::bind(&[binding(port, 80, "db"), binding(port, 81, "cache")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("port {port} is published by both db and cache")
        );
        let err = Forwarders::bind(&[binding(0, 0, "db")]).unwrap_err();
        assert!(matches!(err, NetError::ZeroTargetPort { .. }), "{err}");
    }

    #[test]
    fn start_outside_a_runtime_fails() {
        let mut fwd = Forwarders::bind(&[binding(0, 80, "db")]).unwrap();
        assert!(matches!(fwd.start(None), Err(NetError::NoRuntime)));
    }

    #[tokio::test]
    async fn host_network_forwards_to_host_loopback() {
        let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = service.local_addr().unwrap().port();
        spawn_echo(service);
        let mut fwd = Forwarders::bind(&[binding(0, target, "Background_1")]).unwrap();
        fwd.start(None).unwrap();
        round_trip(fwd.ports()[0], 7, 4096).await;
        fwd.close().await;
    }

    #[tokio::test]
    async fn host_network_same_port_releases_it_for_the_service() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let mut fwd = Forwarders::bind(&[binding(port, port, "Background_1")]).unwrap();
        // Bound up front: nobody else can take it before start.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        fwd.start(None).unwrap();
        let service = std::net::TcpListener::bind(("127.0.0.1", port))
            .expect("the service can bind its own port after start");
        assert_eq!(fwd.ports(), [port]);
        drop(service);
        fwd.close().await;
    }

    #[tokio::test]
    async fn removing_the_namespace_after_close_leaves_no_mount() {
        let mut guard = NsGuard::new();
        let mut fwd = Forwarders::bind(&[binding(0, 80, "db")]).unwrap();
        fwd.start(Some(guard.ns())).unwrap();
        fwd.close().await;
        guard.ns.take().unwrap().remove().unwrap();
        assert!(mounts_under(guard.dir.path()).is_empty());
    }
}
