//! Passing one file descriptor to whoever connects to a Unix socket
//! (`SCM_RIGHTS`): how a GPU pool allocated with a POSIX-FD shareable handle
//! reaches a peer in another pod on the same node, where legacy CUDA IPC
//! handles do not open (different PID namespaces). Both pods mount the
//! folder holding the socket. Knows nothing about CUDA.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A one-byte message with room for one descriptor, boxed so that the
/// header's pointers to its own buffers stay valid.
struct FdMsg {
    byte: [u8; 1],
    iov: libc::iovec,
    control: Vec<u8>,
    msg: libc::msghdr,
}

impl FdMsg {
    fn new() -> Box<FdMsg> {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        let mut m = Box::new(FdMsg {
            byte: [b'F'],
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 1,
            },
            control: vec![0u8; space],
            // SAFETY: all-zero is a valid empty msghdr.
            msg: unsafe { std::mem::zeroed() },
        });
        m.iov.iov_base = m.byte.as_mut_ptr().cast();
        m.msg.msg_iov = &mut m.iov;
        m.msg.msg_iovlen = 1;
        m.msg.msg_control = m.control.as_mut_ptr().cast();
        m.msg.msg_controllen = space as _;
        m
    }
}

/// Sends `fd` with a one-byte payload.
pub fn send_fd(stream: &UnixStream, fd: BorrowedFd<'_>) -> io::Result<()> {
    let m = FdMsg::new();
    // SAFETY: the control buffer has room for one header and one int.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&m.msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    // SAFETY: a valid socket and message.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &m.msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one descriptor sent by [`send_fd`].
pub fn recv_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut m = FdMsg::new();
    // SAFETY: a valid socket and message; received fds are close-on-exec.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut m.msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel filled in.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&m.msg);
        if n == 0
            || cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent no file descriptor",
            ));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Connects to a [`FdServer`] and takes its descriptor.
pub fn fetch_fd(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    recv_fd(&stream)
}

/// Hands `fd` to every process that connects to its socket, until dropped.
/// The socket is readable and writable by its owner only (mode 0600):
/// whoever holds the descriptor can read and write the whole pool.
pub struct FdServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdServer {
    pub fn start(path: &Path, fd: OwnedFd) -> io::Result<FdServer> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-fd-server".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = send_fd(&stream, fd.as_fd()) {
                                tracing::debug!(error = %e, "passing the pool's descriptor failed");
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "descriptor socket accept failed");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })?;
        Ok(FdServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept so the thread sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn temp_file_with(bytes: &[u8]) -> (std::fs::File, PathBuf) {
        let path = std::env::temp_dir().join(format!("tandem-fd-{}", uuid::Uuid::new_v4()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        (f, path)
    }

    #[test]
    fn a_descriptor_crosses_a_socket_pair_and_names_the_same_file() {
        let (f, path) = temp_file_with(b"kv blocks");
        let (a, b) = UnixStream::pair().unwrap();
        send_fd(&a, f.as_fd()).unwrap();
        let got = recv_fd(&b).unwrap();
        assert_ne!(
            got.as_raw_fd(),
            f.as_raw_fd(),
            "the receiver gets its own number"
        );
        let mut g = std::fs::File::from(got);
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "kv blocks");
        // A write through one is seen through the other: the same open file.
        g.write_all(b"!").unwrap();
        let mut all = String::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_string(&mut all)
            .unwrap();
        assert_eq!(all, "kv blocks!");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_message_without_a_descriptor_is_an_error_not_a_bogus_fd() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let err = recv_fd(&b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(a);
        assert!(recv_fd(&b).is_err(), "a closed peer is an error");
    }

    #[test]
    fn the_server_hands_the_descriptor_to_every_client_and_cleans_up() {
        let (f, path) = temp_file_with(b"pool");
        let sock = std::env::temp_dir().join(format!("tandem-fds-{}.sock", uuid::Uuid::new_v4()));
        let server = FdServer::start(&sock, OwnedFd::from(f)).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for _ in 0..3 {
            let fd = fetch_fd(server.path(), Duration::from_secs(5)).unwrap();
            let mut g = std::fs::File::from(fd);
            g.rewind().unwrap();
            let mut s = String::new();
            g.read_to_string(&mut s).unwrap();
            assert_eq!(s, "pool");
        }
        drop(server);
        assert!(!sock.exists());
        assert!(fetch_fd(&sock, Duration::from_secs(1)).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
