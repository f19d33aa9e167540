//! Collectives across processes over MPI: MPICH's MPI-5 standard-ABI library
//! (`libmpi_abi.so.1`, from the `mpich` PyPI wheel that `scripts/mpirun` installs), loaded at
//! run time with `dlopen`, so building kiln never needs MPI.
//!
//! The standard ABI fixes the predefined handles (`MPI_COMM_WORLD` is `0x101`, `MPI_FLOAT`
//! `0x210`, …), so they are constants here rather than values read from a header.
//!
//! Sums are reproducible: [`Mpi::sum_f32`] reduces each of `n` chunks on one rank, adding the
//! ranks' contributions in rank order, then shares the reduced chunks. Every rank ends with the
//! same bits whatever the library's own algorithms, and each rank sends `2 (n − 1) / n` of the
//! buffer, as a ring all-reduce does ([`Traffic`] counts it).
//!
//! Errors: the library is set to return errors rather than abort, and a rank whose work fails
//! ends the whole job with its message ([`Mpi::abort`]), so no rank waits for a dead peer; a
//! job that succeeds [`Mpi::finish`]es on every rank. A rank that dies outright is killed with
//! the job by the launcher. A rank that hangs, or dies unnoticed, is caught by
//! [`Mpi::set_timeout`]: a collective that waits past the limit ends the job from the waiting
//! rank, naming the collective. `MPIEXEC_TIMEOUT` bounds the whole job besides.

use std::ffi::{c_char, c_int, c_void, CString};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What went wrong with MPI.
#[derive(Debug)]
pub struct MpiError(pub String);

impl fmt::Display for MpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MpiError {}

type Handle = *mut c_void;

const COMM_WORLD: Handle = 0x101 as Handle;
const FLOAT: Handle = 0x210 as Handle;
const DOUBLE: Handle = 0x214 as Handle;
const BYTE: Handle = 0x247 as Handle;
const UINT64: Handle = 0x259 as Handle;
const SUM: Handle = 0x21 as Handle;
const ERRORS_RETURN: Handle = 0x143 as Handle;

type InitFn = unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char) -> c_int;
type IntOutFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type CommIntFn = unsafe extern "C" fn(Handle, *mut c_int) -> c_int;
type FinalizeFn = unsafe extern "C" fn() -> c_int;
type SetErrFn = unsafe extern "C" fn(Handle, Handle) -> c_int;
type AllreduceFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle) -> c_int;
type AlltoallvFn = unsafe extern "C" fn(
    *const c_void,
    *const c_int,
    *const c_int,
    Handle,
    *mut c_void,
    *const c_int,
    *const c_int,
    Handle,
    Handle,
) -> c_int;
type AllgathervFn = unsafe extern "C" fn(
    *const c_void,
    c_int,
    Handle,
    *mut c_void,
    *const c_int,
    *const c_int,
    Handle,
    Handle,
) -> c_int;
type BarrierFn = unsafe extern "C" fn(Handle) -> c_int;
type SplitFn = unsafe extern "C" fn(Handle, c_int, c_int, *mut Handle) -> c_int;
type BcastFn = unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int, *mut c_char, *mut c_int) -> c_int;

/// What an all-to-all carries, for its [`Traffic`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Routed rows ([`Traffic::exchange_bytes`]).
    Rows,
    /// A value or two per row ([`Traffic::scalar_bytes`]).
    Small,
}

/// Bytes this rank sent in collectives, by the collective's purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// The reduce-scatter half of sums (contributions sent to the chunk's owner).
    pub reduce_bytes: u64,
    /// The all-gather half of sums (reduced chunks shared).
    pub gather_bytes: u64,
    /// Small all-reduces of scalars (losses, expert loads), and what goes with the expert
    /// all-to-alls: per-expert row counts, the rows' routing weights and their gradients.
    pub scalar_bytes: u64,
    /// Routed rows sent to other ranks in the experts' all-to-alls (dispatch and combine,
    /// forward and backward).
    pub exchange_bytes: u64,
}

/// The library's entry points, shared by every communicator.
struct Lib {
    handle: *mut c_void,
    finalize: FinalizeFn,
    allreduce: AllreduceFn,
    alltoallv: AlltoallvFn,
    allgatherv: AllgathervFn,
    barrier: BarrierFn,
    bcast: BcastFn,
    split: SplitFn,
    comm_rank: CommIntFn,
    comm_size: CommIntFn,
    set_errhandler: SetErrFn,
    error_string: ErrorStringFn,
}

/// An initialized MPI library and this process's place in one communicator:
/// `MPI_COMM_WORLD` from [`Mpi::init`], or a part of it from [`Mpi::split`].
pub struct Mpi {
    lib: std::rc::Rc<Lib>,
    comm: Handle,
    rank: usize,
    size: usize,
    traffic: std::cell::Cell<Traffic>,
    /// The collective in progress and since when, watched by [`Mpi::set_timeout`]'s thread
    /// (one for every communicator of the process).
    waiting: Arc<Mutex<Option<(Instant, &'static str)>>>,
}

/// Marks a collective as in progress while it lives.
struct Waiting<'a>(&'a Mutex<Option<(Instant, &'static str)>>);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.lock() {
            *w = None;
        }
    }
}

/// The environment variable naming the library; `scripts/mpirun` sets it.
pub const LIB_VAR: &str = "KILN_MPI_LIB";

impl Mpi {
    /// Whether this process was started by an MPI launcher (Hydra's `PMI_RANK`, or
    /// [`LIB_VAR`]).
    pub fn launched() -> bool {
        std::env::var_os("PMI_RANK").is_some() || std::env::var_os(LIB_VAR).is_some()
    }

    /// Loads the library ([`LIB_VAR`], else `libmpi_abi.so.1` on the loader's path) and
    /// initializes MPI.
    pub fn init() -> Result<Mpi, MpiError> {
        let path = std::env::var(LIB_VAR).unwrap_or_else(|_| "libmpi_abi.so.1".to_string());
        let c_path = CString::new(path.clone())
            .map_err(|_| MpiError(format!("a NUL in {LIB_VAR}: {path}")))?;
        // SAFETY: dlopen with a valid C string.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            let why = crate::dl_error();
            return Err(MpiError(format!(
                "cannot load the MPI library {path}: {why}; run through scripts/mpirun, which \
                 installs MPICH and sets {LIB_VAR}"
            )));
        }
        let sym = |name: &str| -> Result<*mut c_void, MpiError> {
            let c = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: looks a symbol up in a library we hold open.
            let f = unsafe { libc::dlsym(handle, c.as_ptr()) };
            if f.is_null() {
                Err(MpiError(format!(
                    "{path} has no {name}: not an MPI ABI library"
                )))
            } else {
                Ok(f)
            }
        };
        // SAFETY: each symbol has the standard ABI's signature for its name (MPI-5 §20).
        let (init, initialized, rank_fn, size_fn, set_err) = unsafe {
            (
                std::mem::transmute::<*mut c_void, InitFn>(sym("MPI_Init")?),
                std::mem::transmute::<*mut c_void, IntOutFn>(sym("MPI_Initialized")?),
                std::mem::transmute::<*mut c_void, CommIntFn>(sym("MPI_Comm_rank")?),
                std::mem::transmute::<*mut c_void, CommIntFn>(sym("MPI_Comm_size")?),
                std::mem::transmute::<*mut c_void, SetErrFn>(sym("MPI_Comm_set_errhandler")?),
            )
        };
        // SAFETY: as above.
        let lib = unsafe {
            Lib {
                handle,
                finalize: std::mem::transmute::<*mut c_void, FinalizeFn>(sym("MPI_Finalize")?),
                allreduce: std::mem::transmute::<*mut c_void, AllreduceFn>(sym("MPI_Allreduce")?),
                alltoallv: std::mem::transmute::<*mut c_void, AlltoallvFn>(sym("MPI_Alltoallv")?),
                allgatherv: std::mem::transmute::<*mut c_void, AllgathervFn>(sym(
                    "MPI_Allgatherv",
                )?),
                barrier: std::mem::transmute::<*mut c_void, BarrierFn>(sym("MPI_Barrier")?),
                bcast: std::mem::transmute::<*mut c_void, BcastFn>(sym("MPI_Bcast")?),
                split: std::mem::transmute::<*mut c_void, SplitFn>(sym("MPI_Comm_split")?),
                comm_rank: rank_fn,
                comm_size: size_fn,
                set_errhandler: set_err,
                error_string: std::mem::transmute::<*mut c_void, ErrorStringFn>(sym(
                    "MPI_Error_string",
                )?),
            }
        };
        let mut mpi = Mpi {
            lib: std::rc::Rc::new(lib),
            comm: COMM_WORLD,
            rank: 0,
            size: 1,
            traffic: Default::default(),
            waiting: Default::default(),
        };
        let mut flag: c_int = 0;
        // SAFETY: valid out-pointers; MPI_Init accepts null argc/argv.
        unsafe {
            initialized(&mut flag);
            if flag == 0 {
                mpi.check(init(std::ptr::null_mut(), std::ptr::null_mut()), "MPI_Init")?;
            }
        }
        mpi.join()?;
        Ok(mpi)
    }

    /// Sets the communicator to return errors rather than abort, and reads this process's
    /// rank and the communicator's size.
    fn join(&mut self) -> Result<(), MpiError> {
        let (mut r, mut s) = (0, 0);
        // SAFETY: MPI is initialized, `comm` is a valid communicator, and the out-pointers
        // are valid.
        unsafe {
            self.check(
                (self.lib.set_errhandler)(self.comm, ERRORS_RETURN),
                "MPI_Comm_set_errhandler",
            )?;
            self.check((self.lib.comm_rank)(self.comm, &mut r), "MPI_Comm_rank")?;
            self.check((self.lib.comm_size)(self.comm, &mut s), "MPI_Comm_size")?;
        }
        self.rank = r as usize;
        self.size = s as usize;
        Ok(())
    }

    /// The ranks of this communicator that give the same `color`, ordered by `key`, as a
    /// communicator of their own (`MPI_Comm_split`). Every rank must call it. Its traffic is
    /// counted apart from this one's; the timeout ([`Mpi::set_timeout`]) watches it too.
    pub fn split(&self, color: usize, key: usize) -> Result<Mpi, MpiError> {
        let mut comm: Handle = std::ptr::null_mut();
        let _w = self.wait_for("MPI_Comm_split");
        // SAFETY: a valid communicator and out-pointer; every rank calls this.
        let rc = unsafe { (self.lib.split)(self.comm, color as c_int, key as c_int, &mut comm) };
        self.check(rc, "MPI_Comm_split")?;
        let mut part = Mpi {
            lib: std::rc::Rc::clone(&self.lib),
            comm,
            rank: 0,
            size: 1,
            traffic: Default::default(),
            waiting: Arc::clone(&self.waiting),
        };
        part.join()?;
        Ok(part)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes sent so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    fn check(&self, rc: c_int, what: &str) -> Result<(), MpiError> {
        if rc == 0 {
            return Ok(());
        }
        let mut buf = vec![0 as c_char; 1024];
        let mut len: c_int = 0;
        // SAFETY: the buffer holds MPI_MAX_ERROR_STRING (at most 1024) characters.
        unsafe { (self.lib.error_string)(rc, buf.as_mut_ptr(), &mut len) };
        let bytes: Vec<u8> = buf[..len.max(0) as usize]
            .iter()
            .map(|&c| c as u8)
            .collect();
        Err(MpiError(format!(
            "rank {}: {what} failed: {}",
            self.rank,
            String::from_utf8_lossy(&bytes).trim()
        )))
    }

    /// Ends the whole job: this rank prints its message and exits with `code`, and the
    /// launcher, seeing a rank exit without finalizing, kills the others (MPICH's Hydra does
    /// so within a fraction of a second). `MPI_Abort` would end the job too, but the launcher
    /// can drop the output its ranks had not yet forwarded, this message among it.
    pub fn abort(&self, message: &str, code: i32) -> ! {
        use std::io::Write;
        let line = format!(
            "error: rank {} of {}: {message}; ending the job\n",
            self.rank, self.size
        );
        let mut err = std::io::stderr();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
        std::process::exit(code.max(1))
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<(), MpiError> {
        let _w = self.wait_for("MPI_Barrier");
        // SAFETY: MPI is initialized.
        self.check(unsafe { (self.lib.barrier)(self.comm) }, "MPI_Barrier")
    }

    /// Copies `root`'s `data` to every rank (for example the NCCL unique id a communicator
    /// starts from).
    pub fn broadcast_bytes(&self, data: &mut [u8], root: usize) -> Result<(), MpiError> {
        let _w = self.wait_for("MPI_Bcast");
        // SAFETY: `data` holds `data.len()` bytes on every rank.
        let rc = unsafe {
            (self.lib.bcast)(
                data.as_mut_ptr().cast(),
                data.len() as c_int,
                BYTE,
                root as c_int,
                self.comm,
            )
        };
        self.check(rc, "MPI_Bcast")
    }

    /// Ends the job from this rank when one collective waits longer than `limit` for the
    /// others (a rank that died without the launcher noticing, or one that hangs): a thread
    /// watches the collective in progress and, past the limit, prints which one on this
    /// rank and exits, which makes the launcher end every rank.
    pub fn set_timeout(&self, limit: Duration) {
        let waiting = Arc::clone(&self.waiting);
        let (rank, size) = (self.rank, self.size);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100).min(limit));
            let stuck = waiting
                .lock()
                .ok()
                .and_then(|w| *w)
                .filter(|(since, _)| since.elapsed() > limit);
            if let Some((_, what)) = stuck {
                use std::io::Write;
                let line = format!(
                    "error: rank {rank} of {size}: {what} waited more than {} s for the other \
                     ranks (one may have died or hung; --collective-timeout sets the limit); \
                     ending the job\n",
                    limit.as_secs_f64()
                );
                let mut err = std::io::stderr();
                let _ = err.write_all(line.as_bytes());
                let _ = err.flush();
                std::process::exit(1);
            }
        });
    }

    /// Marks `what` as in progress until the guard drops.
    fn wait_for(&self, what: &'static str) -> Waiting<'_> {
        if let Ok(mut w) = self.waiting.lock() {
            *w = Some((Instant::now(), what));
        }
        Waiting(&self.waiting)
    }

    /// Sums `data` over every rank, in place, with the same bits on every rank: chunk `j`
    /// (of `size` near-equal chunks, [`chunk`]) is added up on rank `j` in rank order, then
    /// shared: a reduce-scatter, then an all-gather.
    pub fn sum_f32(&self, data: &mut [f32]) -> Result<(), MpiError> {
        if self.size == 1 {
            return Ok(());
        }
        let mine = self.reduce_scatter_f32(data)?;
        self.all_gather_f32(&mine, data)
    }

    /// The counts and displacements of `len` values cut into one [`chunk`] per rank.
    fn chunks(&self, len: usize) -> Result<(Vec<c_int>, Vec<c_int>), MpiError> {
        if len > c_int::MAX as usize {
            return Err(MpiError(format!(
                "rank {}: {len} values exceed the {} an MPI count can hold",
                self.rank,
                c_int::MAX
            )));
        }
        let n = self.size;
        let counts = (0..n).map(|j| chunk(len, j, n).len() as c_int).collect();
        let displs = (0..n).map(|j| chunk(len, j, n).start as c_int).collect();
        Ok((counts, displs))
    }

    /// Sums `data` over every rank and returns this rank's [`chunk`] of the sum, added in
    /// rank order whatever the library does.
    pub fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, MpiError> {
        let n = self.size;
        let (counts, displs) = self.chunks(data.len())?;
        let mine = counts[self.rank] as usize;
        if n == 1 {
            return Ok(data.to_vec());
        }
        // Every rank sends chunk j to rank j; this rank receives its chunk from everyone.
        let mut gathered = vec![0f32; mine * n];
        let recv_counts = vec![mine as c_int; n];
        let recv_displs: Vec<c_int> = (0..n).map(|r| (r * mine) as c_int).collect();
        self.alltoallv(
            (data, &counts, &displs),
            (&mut gathered, &recv_counts, &recv_displs),
            FLOAT,
        )?;
        let mut reduced = vec![0f32; mine];
        for (i, out) in reduced.iter_mut().enumerate() {
            // Rank order, whatever the library did.
            *out = (0..n).fold(0f32, |acc, r| acc + gathered[r * mine + i]);
        }
        let mut t = self.traffic.get();
        t.reduce_bytes += (data.len() - mine) as u64 * 4;
        self.traffic.set(t);
        Ok(reduced)
    }

    /// Fills `data` with every rank's `mine`, each at its [`chunk`] of `data`.
    pub fn all_gather_f32(&self, mine: &[f32], data: &mut [f32]) -> Result<(), MpiError> {
        let n = self.size;
        let (counts, displs) = self.chunks(data.len())?;
        if mine.len() != counts[self.rank] as usize {
            return Err(MpiError(format!(
                "rank {}: all-gather of {} values given {}, not its chunk of {}",
                self.rank,
                data.len(),
                mine.len(),
                counts[self.rank]
            )));
        }
        if n == 1 {
            data.copy_from_slice(mine);
            return Ok(());
        }
        let _w = self.wait_for("MPI_Allgatherv");
        // SAFETY: every rank's chunk lands at its displacement inside `data`.
        let rc = unsafe {
            (self.lib.allgatherv)(
                mine.as_ptr().cast(),
                mine.len() as c_int,
                FLOAT,
                data.as_mut_ptr().cast(),
                counts.as_ptr(),
                displs.as_ptr(),
                FLOAT,
                self.comm,
            )
        };
        self.check(rc, "MPI_Allgatherv")?;
        let mut t = self.traffic.get();
        t.gather_bytes += (mine.len() * (n - 1)) as u64 * 4;
        self.traffic.set(t);
        Ok(())
    }

    /// Sums a few f64 values over every rank (losses, counts), in place.
    pub fn sum_f64(&self, data: &mut [f64]) -> Result<(), MpiError> {
        if self.size == 1 {
            return Ok(());
        }
        let send = data.to_vec();
        let _w = self.wait_for("MPI_Allreduce");
        // SAFETY: both buffers hold `data.len()` doubles.
        let rc = unsafe {
            (self.lib.allreduce)(
                send.as_ptr().cast(),
                data.as_mut_ptr().cast(),
                data.len() as c_int,
                DOUBLE,
                SUM,
                self.comm,
            )
        };
        self.check(rc, "MPI_Allreduce")?;
        let mut t = self.traffic.get();
        t.scalar_bytes += data.len() as u64 * 8;
        self.traffic.set(t);
        Ok(())
    }
}

impl Mpi {
    /// `MPI_Alltoallv` of values of MPI type `ty` (which must be `T`'s): part `i` of `send`
    /// (`counts[i]` values from `displs[i]`) goes to rank `i`, and rank `i`'s part for this
    /// one lands in `recv` as its counts and displacements say.
    fn alltoallv<T: Copy>(
        &self,
        (send, sc, sd): (&[T], &[c_int], &[c_int]),
        (recv, rc, rd): (&mut [T], &[c_int], &[c_int]),
        ty: Handle,
    ) -> Result<(), MpiError> {
        let fits = |len: usize, c: &[c_int], d: &[c_int]| {
            c.len() == self.size
                && d.len() == self.size
                && c.iter()
                    .zip(d)
                    .all(|(&c, &d)| c >= 0 && d >= 0 && (c as usize + d as usize) <= len)
        };
        if !fits(send.len(), sc, sd) || !fits(recv.len(), rc, rd) {
            return Err(MpiError(format!(
                "rank {}: all-to-all counts outside the buffers",
                self.rank
            )));
        }
        let _w = self.wait_for("MPI_Alltoallv");
        // SAFETY: every part lies inside its buffer (checked above), and `ty` is `T`'s type.
        let rc = unsafe {
            (self.lib.alltoallv)(
                send.as_ptr().cast(),
                sc.as_ptr(),
                sd.as_ptr(),
                ty,
                recv.as_mut_ptr().cast(),
                rc.as_ptr(),
                rd.as_ptr(),
                ty,
                self.comm,
            )
        };
        self.check(rc, "MPI_Alltoallv")
    }

    /// Sends `send[i]` to rank `i` and returns what each rank sent this one, in rank order:
    /// an all-to-all of counts (8 bytes per rank, counted as scalars).
    pub fn all_to_all_counts(&self, send: &[u64]) -> Result<Vec<u64>, MpiError> {
        let n = self.size;
        if send.len() % n != 0 {
            return Err(MpiError(format!(
                "rank {}: {} counts do not split over {n} ranks",
                self.rank,
                send.len()
            )));
        }
        let each = send.len() / n;
        let mut recv = vec![0u64; send.len()];
        if n == 1 {
            recv.copy_from_slice(send);
            return Ok(recv);
        }
        let counts = vec![each as c_int; n];
        let displs: Vec<c_int> = (0..n).map(|r| (r * each) as c_int).collect();
        self.alltoallv(
            (send, &counts, &displs),
            (&mut recv, &counts, &displs),
            UINT64,
        )?;
        let mut t = self.traffic.get();
        t.scalar_bytes += (each * (n - 1) * 8) as u64;
        self.traffic.set(t);
        Ok(recv)
    }

    /// Sends the `send_counts[i]` values of `send` that follow rank `i − 1`'s to rank `i`,
    /// and receives `recv_counts[i]` values from each rank `i`, laid end to end in rank
    /// order (`MPI_Alltoallv`). The values this rank keeps are copied, not counted as sent;
    /// the others are counted as `payload` says.
    pub fn all_to_all_f32(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
        payload: Payload,
    ) -> Result<Vec<f32>, MpiError> {
        let n = self.size;
        let offsets = |c: &[usize]| -> Result<(Vec<c_int>, Vec<c_int>, usize), MpiError> {
            let total: usize = c.iter().sum();
            if c.len() != n || total > c_int::MAX as usize {
                return Err(MpiError(format!(
                    "rank {}: an all-to-all of {total} values in {} parts over {n} ranks",
                    self.rank,
                    c.len()
                )));
            }
            let displs = c
                .iter()
                .scan(0usize, |at, &k| {
                    let d = *at;
                    *at += k;
                    Some(d as c_int)
                })
                .collect();
            Ok((c.iter().map(|&k| k as c_int).collect(), displs, total))
        };
        let (sc, sd, sent) = offsets(send_counts)?;
        let (rc_, rd, total) = offsets(recv_counts)?;
        if sent != send.len() {
            return Err(MpiError(format!(
                "rank {}: all-to-all counts add up to {sent}, the buffer holds {}",
                self.rank,
                send.len()
            )));
        }
        let mut recv = vec![0f32; total];
        self.alltoallv((send, &sc, &sd), (&mut recv, &rc_, &rd), FLOAT)?;
        let mut t = self.traffic.get();
        let bytes = (sent - send_counts[self.rank]) as u64 * 4;
        match payload {
            Payload::Rows => t.exchange_bytes += bytes,
            Payload::Small => t.scalar_bytes += bytes,
        }
        self.traffic.set(t);
        Ok(recv)
    }
}

impl Mpi {
    /// Finalizes MPI: every rank calls this at the end of a job that succeeded. (A rank that
    /// fails calls [`Mpi::abort`] instead, so that no other rank waits for it.)
    pub fn finish(self) {
        // SAFETY: MPI is initialized and no collective is in flight. The library stays
        // loaded: MPICH keeps threads and handlers that outlive finalize. (Communicators
        // split from this one are freed with it.)
        unsafe {
            (self.lib.finalize)();
        }
        let _ = self.lib.handle;
    }
}

/// Rank `j`'s chunk of `len` values cut into `n` near-equal chunks, in rank order:
/// `len·j/n .. len·(j+1)/n`. The reductions and the ZeRO-1 shards cut alike.
pub fn chunk(len: usize, j: usize, n: usize) -> std::ops::Range<usize> {
    len * j / n..len * (j + 1) / n
}
