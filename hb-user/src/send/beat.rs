//! The heartbeat timer: when the next heartbeat is due, as a timerfd
//! (CLOCK_MONOTONIC, absolute: the clock of [`super::monotonic_ns`] and
//! of every due time in the send loop), waited on through the runtime's
//! epoll beside the sockets.
//!
//! Not `tokio::time::sleep_until`, for what it cost every heartbeat
//! (`cargo xtask bench sender`, and strace):
//! - tokio's timer wheel files a deadline 64 ms to 4 s away in a slot of
//!   64 ms, and wakes at the slot's start to sleep again to the deadline
//!   (4 s to 4.4 min away: a slot of 4 s, one more wake-up): at 10 Hz and
//!   at 1 Hz two wake-ups for each heartbeat instead of one;
//! - the heartbeat's timer fired, none is left in the wheel, and arming
//!   the next one "unparks" the runtime: a write to its eventfd right
//!   after the heartbeat's `sendto`, and one more turn of `epoll_wait`.
//!
//! A timerfd wakes once, at the due time to the ns (tokio rounds up to
//! the ms), for one `timerfd_settime` a heartbeat: it is armed for each
//! due time as the loop computes it ([`super::next_due`]), absolute, so
//! the rhythm stays drift-free. One-shot, not periodic: a periodic
//! timerfd arms its next expiry only when its count is read, which is the
//! same one system call, and it would keep a rhythm the loop leaves after
//! a stall.
//!
//! Its count is never read: arming resets it, and under tokio's
//! edge-triggered epoll the next expiry is an event of its own. Whether
//! the heartbeat is due is the clock's to say: a readiness left from a
//! due time that was moved since is passed over ([`Timer::wait`]).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::{Interest, unix::AsyncFd};

use super::monotonic_ns;

/// The heartbeat timer (see the module docs).
pub struct Timer {
    fd: AsyncFd<OwnedFd>,
    /// The due time the loop waits for (CLOCK_MONOTONIC ns; 0: not
    /// armed yet).
    due: u64,
}

impl Timer {
    /// A timer not armed yet; inside the runtime (it registers with its
    /// epoll).
    pub fn new() -> io::Result<Timer> {
        // SAFETY: no pointers; the descriptor returned is ours alone.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the `OwnedFd` keeps its descriptor open, the same one,
        // for as long as the `AsyncFd` that owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(Timer { fd, due: 0 })
    }

    /// Makes [`Timer::wait`] end at `due` (CLOCK_MONOTONIC ns; one that
    /// passed already: at once). A system call only when `due` changed.
    pub fn arm(&mut self, due: u64) -> io::Result<()> {
        // 0 would disarm it; the monotonic clock is past 0.
        let due = due.max(1);
        if due == self.due {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: timespec(0),
            it_value: timespec(due),
        };
        // SAFETY: a valid pointer to an itimerspec, and none for the old
        // value.
        let r = unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.due = due;
        Ok(())
    }

    /// Waits until the due time [`Timer::arm`] gave (for good, not armed
    /// yet). Cancel-safe (a `select!` branch): dropped, it has taken
    /// nothing.
    pub async fn wait(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            // Edge-triggered: the next expiry is the next event.
            ready.clear_ready();
            if self.due > 0 && monotonic_ns() >= self.due {
                return Ok(());
            }
        }
    }
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000).min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// This thread's voluntary context switches (its wake-ups: each is a
    /// sleep that ended) and write calls so far (an eventfd write is one;
    /// `sendto` and `timerfd_settime` are not).
    fn wakeups_and_writes() -> (u64, u64) {
        let field = |file: &str, name: &str| -> u64 {
            let text = std::fs::read_to_string(format!("/proc/thread-self/{file}")).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        (
            field("status", "voluntary_ctxt_switches:"),
            field("io", "syscw:"),
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The send loop's way of waiting, 6 heartbeats 100 ms apart: one
    /// wake-up each, never early, on the drift-free schedule, and no
    /// write to the runtime's eventfd. With `tokio::time::sleep_until`
    /// it was two wake-ups each (the timer wheel's 64 ms slot) and a
    /// write each.
    #[test]
    fn a_heartbeat_costs_one_wake_up_and_no_self_wake() {
        let rt = runtime();
        let (beats, every) = (6u64, 100 * MS);
        let (woke, wake_ups, writes) = rt.block_on(async {
            let mut timer = Timer::new().unwrap();
            let start = monotonic_ns() + 20 * MS;
            let mut next = start;
            let mut woke = Vec::new();
            let before = wakeups_and_writes();
            for _ in 0..beats {
                timer.arm(next).unwrap();
                timer.wait().await.unwrap();
                let now = monotonic_ns();
                woke.push((next, now));
                next = super::super::next_due(next, every, now);
            }
            let after = wakeups_and_writes();
            (woke, after.0 - before.0, after.1 - before.1)
        });
        for (k, &(due, at)) in woke.iter().enumerate() {
            assert!(at >= due, "heartbeat {k} {} ns early", due - at);
            // A shared machine: late by a scheduling delay, not a slot.
            assert!(
                at - due < 50 * MS,
                "heartbeat {k} {} ms late",
                (at - due) / MS
            );
            if at - due < every {
                assert_eq!(due, woke[0].0 + k as u64 * every, "drift-free");
            }
        }
        // One a heartbeat (a preempted sleep may add one), and no write.
        let (most, seen) = (beats + 1, format!("{wake_ups} wake-ups, {writes} writes"));
        assert!(
            wake_ups <= most && writes == 0,
            "{seen} for {beats} heartbeats"
        );
    }

    /// A due time moved later (the interval grew) is waited for: the
    /// readiness of the old one passes over; one moved sooner is taken.
    #[test]
    fn a_moved_due_time_is_the_one_waited_for() {
        runtime().block_on(async {
            let mut timer = Timer::new().unwrap();
            let t0 = monotonic_ns();
            timer.arm(t0 + 20 * MS).unwrap();
            // The old due time passes (its event waits in epoll) while
            // the loop is busy, then it is moved 100 ms on.
            std::thread::sleep(std::time::Duration::from_millis(40));
            timer.arm(t0 + 140 * MS).unwrap();
            timer.wait().await.unwrap();
            assert!(monotonic_ns() >= t0 + 140 * MS);
            // Sooner: from 200 ms to 30 ms.
            let t1 = monotonic_ns();
            timer.arm(t1 + 200 * MS).unwrap();
            timer.arm(t1 + 30 * MS).unwrap();
            timer.wait().await.unwrap();
            let at = monotonic_ns();
            assert!(
                at >= t1 + 30 * MS && at < t1 + 150 * MS,
                "{}",
                (at - t1) / MS
            );
        });
    }

    /// After a stall past the next due time (a stopped process, a
    /// suspended VM) the late heartbeat goes at once, and the next one a
    /// whole interval after it, not at once too.
    #[test]
    fn after_a_stall_the_next_heartbeat_is_a_whole_interval_later() {
        runtime().block_on(async {
            let mut timer = Timer::new().unwrap();
            let every = 30 * MS;
            let mut next = monotonic_ns() + 10 * MS;
            timer.arm(next).unwrap();
            timer.wait().await.unwrap();
            next = super::super::next_due(next, every, monotonic_ns());
            timer.arm(next).unwrap();
            // Stalled 100 ms, past the next due time.
            std::thread::sleep(std::time::Duration::from_millis(100));
            timer.wait().await.unwrap();
            let late = monotonic_ns();
            assert!(late >= next + every, "the late heartbeat");
            next = super::super::next_due(next, every, late);
            assert!(next >= late + every);
            timer.arm(next).unwrap();
            timer.wait().await.unwrap();
            assert!(monotonic_ns() >= next);
        });
    }
}
