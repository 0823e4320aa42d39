//! A TCP proxy on loopback that can cut or stall the network between a Capibara process and
//! Postgres or Redis: the fault injector of the backpressure tests and of `capibara chaos`.
//!
//! - [`Fault::None`]: bytes flow both ways.
//! - [`Fault::Stall`]: connections stay open but no byte moves in either direction (a black
//!   hole: the peer's kernel buffers fill and every read waits), and new connections are
//!   accepted and stalled too. This is what a hung server or a partitioned network looks like
//!   to a client: nothing fails, everything waits.
//! - [`Fault::Cut`]: every open connection is reset and new ones are closed at once (a server
//!   that went away, a firewall that rejects).
//!
//! Threads and blocking sockets only: it carries test and soak traffic, not production load.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    Stall,
    Cut,
}

impl Fault {
    fn from_u8(v: u8) -> Fault {
        match v {
            1 => Fault::Stall,
            2 => Fault::Cut,
            _ => Fault::None,
        }
    }
}

struct Shared {
    fault: AtomicU8,
    /// Bumped by each cut: a connection opened before the latest cut is dead.
    generation: AtomicU64,
    stop: AtomicBool,
    /// Both ends of every open connection, to reset them on a cut.
    open: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    accepted: AtomicU64,
}

/// A running proxy; stops (and drops its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
}

/// How often a stalled copy thread looks whether the fault ended.
const STALL_POLL: Duration = Duration::from_millis(20);

impl FaultProxy {
    /// Listen on a free loopback port and forward each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            fault: AtomicU8::new(0),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(listener, upstream, s))?;
        Ok(FaultProxy {
            addr,
            upstream,
            shared,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn fault(&self) -> Fault {
        Fault::from_u8(self.shared.fault.load(Ordering::SeqCst))
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Apply `fault` from now on. A cut resets every open connection.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.store(fault as u8, Ordering::SeqCst);
        if fault == Fault::Cut {
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            reset_all(&self.shared);
        }
    }

    /// Let traffic flow again.
    pub fn heal(&self) {
        self.set(Fault::None);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        reset_all(&self.shared);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn reset_all(shared: &Shared) {
    let open = std::mem::take(&mut *shared.open.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, a, b) in open {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if Fault::from_u8(shared.fault.load(Ordering::SeqCst)) == Fault::Cut {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let shared = shared.clone();
        // Connecting upstream may itself wait (a stalled proxy accepts and holds the
        // connection): do it off the accept loop.
        let _ = thread::Builder::new()
            .name("fault-proxy-conn".into())
            .spawn(move || {
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
                let generation = shared.generation.load(Ordering::SeqCst);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    return;
                };
                {
                    let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
                    // A cut between accept and here: this connection is dead too.
                    if shared.generation.load(Ordering::SeqCst) != generation {
                        let _ = client.shutdown(Shutdown::Both);
                        let _ = server.shutdown(Shutdown::Both);
                        return;
                    }
                    open.push((id, c2, s2));
                }
                let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
                    return;
                };
                let up = {
                    let shared = shared.clone();
                    thread::spawn(move || pump(client, server, &shared))
                };
                pump(s3, c3, &shared);
                let _ = up.join();
                shared
                    .open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|(i, _, _)| *i != id);
            });
    }
}

/// Copy `from` → `to` until either side closes, holding bytes while the fault is a stall.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While stalled, read nothing: the sender's buffers fill and it waits.
        while Fault::from_u8(shared.fault.load(Ordering::SeqCst)) == Fault::Stall {
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            thread::sleep(STALL_POLL);
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just before a stall began are held until it ends.
        while Fault::from_u8(shared.fault.load(Ordering::SeqCst)) == Fault::Stall {
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            thread::sleep(STALL_POLL);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = io::BufReader::new(s.try_clone().unwrap());
                    let mut w = s;
                    let mut line = String::new();
                    while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                        if w.write_all(line.as_bytes()).is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream, msg: &str) -> io::Result<String> {
        s.write_all(format!("{msg}\n").as_bytes())?;
        let mut r = io::BufReader::new(s.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    }

    #[test]
    fn passes_stalls_and_cuts() {
        let proxy = FaultProxy::start(echo_server()).unwrap();
        let mut s = TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert_eq!(roundtrip(&mut s, "one").unwrap(), "one");

        proxy.set(Fault::Stall);
        let err = roundtrip(&mut s, "two").unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "a stalled connection answers nothing: {err:?}"
        );
        proxy.heal();
        // The held line arrives once the stall ends.
        let mut r = io::BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), "two");

        proxy.set(Fault::Cut);
        let mut buf = [0u8; 8];
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "a cut closes open connections"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            roundtrip(&mut fresh, "three")
                .map(|l| l.is_empty())
                .unwrap_or(true),
            "new connections are closed while cut"
        );
        proxy.heal();
        let mut again = TcpStream::connect(proxy.addr()).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(roundtrip(&mut again, "four").unwrap(), "four");
    }
}
