//! Which event-loop thread reads the next request, when [`Polling`] is configured.
//!
//! Without it every thread blocks in `read(2)` on the device, and the kernel wakes one of
//! them for each request. Where waking a thread means waking an idle CPU (on a virtual
//! machine whose idle CPUs halt, tens of microseconds each time), a process that makes one
//! request after another pays that wake on every request.
//!
//! With it, one thread at a time is the reader. Having answered a request, it reads on:
//! it polls the device for [`Polling::window`] before it blocks, so that the caller's next
//! request finds it running. The other threads wait on a condition variable, outside the
//! kernel's queue, so the kernel has nobody to wake. When a request keeps the reader busy
//! for longer than [`Polling::promote_after`], a timer hands the role to a waiting thread:
//! a slow request holds the others up by that much at the most.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::time::Duration;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::PollFd;
use nix::poll::PollFlags;
use nix::poll::PollTimeout;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::channel::Channel;

/// How the event-loop threads share the reading of requests (see the module's docs).
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub struct Polling {
    /// How long the reader polls the device for the next request before it blocks.
    pub window: Duration,
    /// How long one request may keep the reader before another thread takes over reading.
    pub promote_after: Duration,
}

/// The longest [`Polling::promote_after`] taken; longer ones are cut to it.
const MAX_PROMOTE_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct State {
    /// A thread holds the reader's role.
    taken: bool,
    /// Counts the hand-overs of the role, so its holder can tell it was taken from it.
    term: u64,
    /// Since when the holder has been answering a request rather than reading.
    busy_since: Option<Instant>,
    /// The session is over.
    closed: bool,
    /// The watchdog waits for a request or for the busy reader to finish.
    watching: bool,
}

impl State {
    /// The reader has been answering one request for `at_least`.
    fn busy_for(&self, at_least: Duration) -> bool {
        self.busy_since
            .is_some_and(|since| since.elapsed() >= at_least)
    }
}

/// The reader's role, held by one event-loop thread at a time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Role {
    term: u64,
}

#[derive(Debug)]
pub(crate) struct Readers {
    state: Mutex<State>,
    waiting: Condvar,
    /// Armed while the reader answers a request; when it fires, the watchdog looks out for
    /// a request waiting meanwhile.
    timer: OwnedFd,
    /// Tells the watchdog the reader is done with its request.
    done: OwnedFd,
    polling: Polling,
    /// Whether a watchdog runs: not for a single thread, which has nobody to hand over to.
    watched: bool,
}

fn timer_spec(after: Duration) -> libc::itimerspec {
    libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    }
}

impl Readers {
    /// Whether [`Readers::watch`] is to run.
    pub(crate) fn watched(&self) -> bool {
        self.watched
    }

    /// Shares the reading among `threads` threads.
    pub(crate) fn new(polling: Polling, threads: usize) -> io::Result<Readers> {
        // SAFETY: timerfd_create takes no pointers; a non-negative result is a new fd.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Readers {
            state: Mutex::new(State::default()),
            waiting: Condvar::new(),
            timer,
            // SAFETY: as above.
            done: unsafe { OwnedFd::from_raw_fd(fd) },
            polling: Polling {
                window: polling.window,
                // Zero would disarm the timer rather than fire it at once.
                promote_after: polling
                    .promote_after
                    .clamp(Duration::from_micros(1), MAX_PROMOTE_AFTER),
            },
            watched: threads > 1,
        })
    }

    /// Arms the watchdog's timer, or disarms it with a zero `after`. Cannot fail: the fd is
    /// a timerfd and the time is within range.
    fn set_timer(&self, after: Duration) {
        let spec = timer_spec(after);
        // SAFETY: the fd is a timerfd we own; spec outlives the call; no old value asked for.
        unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut());
        }
    }

    /// Waits until the calling thread holds the reader's role; `None` once the session is over.
    pub(crate) fn become_reader(&self) -> Option<Role> {
        let mut state = self.state.lock();
        loop {
            if state.closed {
                return None;
            }
            if !state.taken {
                state.taken = true;
                return Some(Role { term: state.term });
            }
            self.waiting.wait(&mut state);
        }
    }

    /// Reads the next request as the reader: polls the device for the window, then blocks.
    pub(crate) fn read(&self, ch: &Channel, buf: &mut [u8]) -> nix::Result<usize> {
        let deadline = Instant::now() + self.polling.window;
        loop {
            match ch.receive(buf) {
                Ok(size) => return Ok(size),
                Err(Errno::EAGAIN | Errno::EINTR | Errno::ENOENT) => {}
                Err(err) => return Err(err),
            }
            if Instant::now() < deadline {
                std::hint::spin_loop();
                continue;
            }
            let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// The reader starts answering a request: the timer starts.
    pub(crate) fn answering(&self, role: Role) {
        if !self.watched {
            return;
        }
        let mut state = self.state.lock();
        if state.term == role.term && !state.closed {
            state.busy_since = Some(Instant::now());
            self.set_timer(self.polling.promote_after);
        }
    }

    /// The request is answered: whether the calling thread is still the reader.
    pub(crate) fn answered(&self, role: Role) -> bool {
        let mut state = self.state.lock();
        if state.term != role.term {
            return false;
        }
        if !self.watched || state.closed {
            return true;
        }
        state.busy_since = None;
        self.set_timer(Duration::ZERO);
        if state.watching {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a buffer of 8 to the eventfd we own.
            unsafe { libc::write(self.done.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
        true
    }

    /// Gives the role up, for a thread that leaves while the session goes on.
    pub(crate) fn resign(&self, role: Role) {
        let mut state = self.state.lock();
        if state.term == role.term {
            if !state.closed {
                self.set_timer(Duration::ZERO);
            }
            self.hand_over(&mut state);
        }
    }

    /// Frees the role for a waiting thread; its holder finds out in [`Readers::answered`].
    fn hand_over(&self, state: &mut State) {
        state.taken = false;
        state.busy_since = None;
        state.term += 1;
        self.waiting.notify_one();
    }

    /// Ends the session for every thread.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.waiting.notify_all();
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a buffer of 8 to the eventfd we own.
        unsafe { libc::write(self.done.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        // Wakes the watchdog, which then sees the session is over.
        self.set_timer(Duration::from_nanos(1));
    }

    /// Hands the role on when a request waits while one that has kept the reader longer
    /// than [`Polling::promote_after`] is answered; returns once the session is over.
    pub(crate) fn watch(&self, ch: &Channel) {
        let mut counter = [0u8; 8];
        loop {
            // SAFETY: reads at most 8 bytes into a buffer of 8 from the timerfd we own.
            let read = unsafe { libc::read(self.timer.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
            if read < 0 && Errno::last() != Errno::EINTR {
                return;
            }
            let promote_after = self.polling.promote_after;
            loop {
                {
                    let mut state = self.state.lock();
                    if state.closed {
                        return;
                    }
                    // Not a request begun since the timer fired: that one has its own timer.
                    if !state.busy_for(promote_after) {
                        break;
                    }
                    // SAFETY: as above, from the eventfd we own (non-blocking: it may be unset).
                    unsafe { libc::read(self.done.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
                    state.watching = true;
                }
                let mut fds = [
                    PollFd::new(ch.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.done.as_fd(), PollFlags::POLLIN),
                ];
                let request_waits = match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => fds[0].any().unwrap_or(false),
                    Err(_) => false,
                };
                let mut state = self.state.lock();
                state.watching = false;
                if state.closed {
                    return;
                }
                if state.busy_for(promote_after) && request_waits {
                    self.hand_over(&mut state);
                    break;
                }
            }
        }
    }
}
