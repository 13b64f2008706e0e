//! The host end of the agent protocol: typed calls (init, exec, files, ping) over one multiplexed session.

use std::path::Path;

use hutch_proto::frame::{FramedRecv, FramedSend};
use hutch_proto::mux::Stream;
use hutch_proto::{ExecEvent, ExecInput, ExecRequest, FileChunk, FileMeta, Framed, Identity, MountWorkspace, PutArchive, PutFile, Reply, Request, Session, CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::SandboxError;

/// A live session with a guest agent.
#[derive(Clone)]
pub struct AgentClient {
    session: Session,
}

/// A running process in the guest: send input, receive its events.
pub struct ExecHandle {
    pub input: ExecInputSender,
    pub events: ExecEvents,
}

pub struct ExecInputSender {
    tx: FramedSend<WriteHalf<Stream>>,
}

pub struct ExecEvents {
    rx: FramedRecv<ReadHalf<Stream>>,
}

impl ExecInputSender {
    pub async fn send(&mut self, input: ExecInput) -> Result<(), SandboxError> {
        self.tx.send(&input).await.map_err(SandboxError::Channel)
    }
}

impl ExecEvents {
    /// The next event; `None` when the stream ended without an exit status (the VM went away).
    pub async fn next(&mut self) -> Option<ExecEvent> {
        self.rx.recv().await.ok()
    }
}

impl AgentClient {
    pub fn new(session: Session) -> Self {
        Self { session }
    }

    async fn request(&self, req: &Request) -> Result<Framed<Stream>, SandboxError> {
        let stream = self.session.open().await.map_err(SandboxError::Mux)?;
        let mut framed = Framed::new(stream);
        framed.send(req).await.map_err(SandboxError::Channel)?;
        Ok(framed)
    }

    async fn reply(framed: &mut Framed<Stream>, what: &str) -> Result<(), SandboxError> {
        match framed.recv::<Reply>().await.map_err(SandboxError::Channel)? {
            Reply::Ok => Ok(()),
            Reply::Err(e) => Err(SandboxError::Guest(format!("{what}: {e}"))),
        }
    }

    pub async fn init(&self, id: Identity) -> Result<(), SandboxError> {
        let mut f = self.request(&Request::Init(id)).await?;
        Self::reply(&mut f, "setting the sandbox identity").await
    }

    pub async fn ping(&self) -> Result<(), SandboxError> {
        let mut f = self.request(&Request::Ping).await?;
        Self::reply(&mut f, "ping").await
    }

    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle, SandboxError> {
        let framed = self.request(&Request::Exec(req)).await?;
        let (tx, rx) = framed.split();
        Ok(ExecHandle { input: ExecInputSender { tx }, events: ExecEvents { rx } })
    }

    /// Runs a command to completion and collects its output (for small outputs: tests, setup steps).
    pub async fn run(&self, argv: &[&str]) -> Result<Output, SandboxError> {
        let req = ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), env: vec![], cwd: None, stdin: false, tty: None };
        self.run_request(req).await
    }

    /// As [`AgentClient::run`], for a full request (environment, working directory).
    pub async fn run_request(&self, req: ExecRequest) -> Result<Output, SandboxError> {
        let mut h = self.exec(req).await?;
        let mut out = Output::default();
        while let Some(ev) = h.events.next().await {
            match ev {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exited(st) => {
                    out.status = Some(st);
                    return Ok(out);
                }
                ExecEvent::SpawnFailed { message, .. } => return Err(SandboxError::Guest(message)),
            }
        }
        Err(SandboxError::Guest("the process's stream ended without an exit status".into()))
    }

    pub async fn put_file<R: AsyncRead + Unpin>(&self, guest_path: &str, mode: u32, size: u64, data: R) -> Result<(), SandboxError> {
        let put = PutFile { path: guest_path.to_string(), mode, size, parents: true };
        let mut f = self.request(&Request::PutFile(put)).await?;
        Self::send_chunks(&mut f, size, data).await?;
        Self::reply(&mut f, &format!("writing {guest_path}")).await
    }

    /// Mounts the workspace drive (the sandbox's `workspace_image`) read-only with a writable overlay at `target`.
    /// `with_base`: the image is a delta whose unchanged data lives in the image in the base slot
    /// (`workspace_base`), given to erofs as its extra device.
    pub async fn mount_workspace(&self, target: &str, with_base: bool) -> Result<(), SandboxError> {
        let m = MountWorkspace {
            target: target.to_string(),
            serial: hutch_vmm::WORKSPACE_SERIAL.to_string(),
            base_serial: with_base.then(|| hutch_vmm::WORKSPACE_BASE_SERIAL.to_string()),
        };
        let mut f = self.request(&Request::MountWorkspace(m)).await?;
        Self::reply(&mut f, &format!("mounting the workspace at {target}")).await
    }

    /// Whether the workspace overlay's upper layer is provably empty (nothing in the workspace changed); `false`
    /// when it is not, or the agent cannot tell (then the full check decides).
    pub async fn workspace_untouched(&self) -> Result<bool, SandboxError> {
        let mut f = self.request(&Request::WorkspaceUntouched).await?;
        match f.recv::<Reply>().await.map_err(SandboxError::Channel)? {
            Reply::Ok => Ok(true),
            Reply::Err(_) => Ok(false),
        }
    }

    /// Unpacks the tar archive at `host` into the guest directory `dir` (created if missing), inside the agent.
    pub async fn put_host_archive(&self, host: &Path, dir: &str) -> Result<(), SandboxError> {
        let (file, meta) = open_upload(host).await?;
        let mut f = self.request(&Request::PutArchive(PutArchive { dir: dir.to_string(), size: meta.len() })).await?;
        Self::send_chunks(&mut f, meta.len(), file).await?;
        Self::reply(&mut f, &format!("unpacking into {dir}")).await
    }

    async fn send_chunks<R: AsyncRead + Unpin>(f: &mut Framed<Stream>, size: u64, mut data: R) -> Result<(), SandboxError> {
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        loop {
            let n = data.read(&mut buf).await.map_err(|e| SandboxError::HostIo { what: "read upload source".into(), source: e })?;
            if n == 0 {
                break;
            }
            sent += n as u64;
            f.send(&FileChunk::Data(buf[..n].to_vec())).await.map_err(SandboxError::Channel)?;
        }
        if sent != size {
            return Err(SandboxError::Guest(format!("upload source changed size while copying ({sent} of {size} bytes)")));
        }
        f.send(&FileChunk::End).await.map_err(SandboxError::Channel)
    }

    pub async fn put_host_file(&self, host: &Path, guest_path: &str) -> Result<(), SandboxError> {
        use std::os::unix::fs::PermissionsExt;
        let (file, meta) = open_upload(host).await?;
        self.put_file(guest_path, meta.permissions().mode(), meta.len(), file).await
    }

    /// Streams a guest file into `out`; returns its metadata. Holes arrive as zeros.
    pub async fn get_file<W: AsyncWrite + Unpin>(&self, guest_path: &str, out: &mut W) -> Result<FileMeta, SandboxError> {
        let mut f = self.request(&Request::GetFile { path: guest_path.to_string() }).await?;
        let meta = f.recv::<Result<FileMeta, String>>().await.map_err(SandboxError::Channel)?.map_err(SandboxError::Guest)?;
        let werr = |e| SandboxError::HostIo { what: "write download".into(), source: e };
        let mut got = 0u64;
        loop {
            let n = match f.recv::<FileChunk>().await.map_err(SandboxError::Channel)? {
                FileChunk::Data(b) => {
                    check_room(guest_path, got, b.len() as u64, meta.size)?;
                    out.write_all(&b).await.map_err(werr)?;
                    b.len() as u64
                }
                FileChunk::Hole(n) => {
                    check_room(guest_path, got, n, meta.size)?;
                    let zeros = vec![0u8; CHUNK];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(CHUNK as u64) as usize;
                        out.write_all(&zeros[..k]).await.map_err(werr)?;
                        left -= k as u64;
                    }
                    n
                }
                FileChunk::End => break,
            };
            got += n;
        }
        if got != meta.size {
            return Err(SandboxError::Guest(format!("{guest_path} changed size while copying ({got} of {} bytes)", meta.size)));
        }
        out.flush().await.map_err(werr)?;
        Ok(meta)
    }

    /// Copies a guest file into the host file `out` (empty, just created), refusing it before any byte is written
    /// if the guest says it is larger than `max`, and failing as soon as more than it said arrives. Holes, and
    /// blocks of zeros, are skipped with a seek, so the host file is as sparse as the guest's (or sparser).
    pub async fn get_file_sparse(&self, guest_path: &str, out: &mut tokio::fs::File, max: u64) -> Result<FileMeta, SandboxError> {
        use tokio::io::AsyncSeekExt;
        let mut f = self.request(&Request::GetFile { path: guest_path.to_string() }).await?;
        let meta = f.recv::<Result<FileMeta, String>>().await.map_err(SandboxError::Channel)?.map_err(SandboxError::Guest)?;
        if meta.size > max {
            return Err(SandboxError::TooLarge { what: guest_path.to_string(), size: meta.size, max });
        }
        let werr = |e| SandboxError::HostIo { what: "write download".into(), source: e };
        // `got`: bytes of the file received so far; `cursor`: where the host file's offset is.
        let (mut got, mut cursor) = (0u64, 0u64);
        loop {
            match f.recv::<FileChunk>().await.map_err(SandboxError::Channel)? {
                FileChunk::Data(b) => {
                    check_room(guest_path, got, b.len() as u64, meta.size)?;
                    for (i, block) in b.chunks(SPARSE_BLOCK).enumerate() {
                        if block.iter().all(|&x| x == 0) {
                            continue;
                        }
                        let at = got + (i * SPARSE_BLOCK) as u64;
                        if cursor != at {
                            out.seek(std::io::SeekFrom::Start(at)).await.map_err(werr)?;
                        }
                        out.write_all(block).await.map_err(werr)?;
                        cursor = at + block.len() as u64;
                    }
                    got += b.len() as u64;
                }
                FileChunk::Hole(n) => {
                    check_room(guest_path, got, n, meta.size)?;
                    got += n;
                }
                FileChunk::End => break,
            }
        }
        if got != meta.size {
            return Err(SandboxError::Guest(format!("{guest_path} changed size while copying ({got} of {} bytes)", meta.size)));
        }
        out.flush().await.map_err(werr)?;
        // The length, trailing holes included, without writing them.
        out.set_len(meta.size).await.map_err(werr)?;
        Ok(meta)
    }

    /// Asks the agent to forget this sandbox and restart itself ([`Request::Respawn`]); the session ends.
    pub async fn respawn(&self) -> Result<(), SandboxError> {
        let mut f = self.request(&Request::Respawn).await?;
        Self::reply(&mut f, "respawn").await
    }

    /// Asks the agent to end this session and keep its processes for the next one ([`Request::Suspend`]); after
    /// the reply it announces `Ready` on the channel.
    pub async fn suspend(&self) -> Result<(), SandboxError> {
        let mut f = self.request(&Request::Suspend).await?;
        Self::reply(&mut f, "suspend").await
    }

    /// A connection to TCP `port` on the guest's loopback, carried over the agent channel (the guest has no
    /// network device): the returned stream's bytes are the connection's.
    pub async fn connect_port(&self, port: u16) -> Result<Stream, SandboxError> {
        let mut stream = self.session.open().await.map_err(SandboxError::Mux)?;
        hutch_proto::frame::write_header(&mut stream, &Request::Connect { port }).await.map_err(SandboxError::Channel)?;
        // Exactly the reply's bytes: what follows is the guest server's.
        match hutch_proto::frame::read_header::<_, Reply>(&mut stream).await.map_err(SandboxError::Channel)? {
            Reply::Ok => Ok(stream),
            Reply::Err(e) => Err(SandboxError::Guest(e)),
        }
    }

    pub async fn power_off(&self) -> Result<(), SandboxError> {
        let mut f = self.request(&Request::PowerOff).await?;
        Self::reply(&mut f, "power off").await
    }
}

/// The granularity at which zero blocks of a download become holes on the host (a file system block).
const SPARSE_BLOCK: usize = 4096;

/// A guest that sends more than the size it announced is refused at the first byte too many.
fn check_room(path: &str, got: u64, more: u64, size: u64) -> Result<(), SandboxError> {
    if got.saturating_add(more) > size {
        return Err(SandboxError::Guest(format!("{path}: the guest sent more than the {size} bytes it announced")));
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: Option<hutch_proto::ExitStatus>,
}

/// Opens a host file to upload: a regular file, with its metadata.
async fn open_upload(host: &Path) -> Result<(tokio::fs::File, std::fs::Metadata), SandboxError> {
    let file = tokio::fs::File::open(host).await.map_err(|e| SandboxError::HostIo { what: format!("cannot open {}", host.display()), source: e })?;
    let meta = file.metadata().await.map_err(|e| SandboxError::HostIo { what: format!("cannot stat {}", host.display()), source: e })?;
    if !meta.is_file() {
        return Err(SandboxError::BadInput(format!("{} is not a regular file (only files can be copied in)", host.display())));
    }
    Ok((file, meta))
}
