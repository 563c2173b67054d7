//! The 48 payload bytes on the stack: `hb-common` parses, verifies and
//! rewrites them there, so the kernel runs the very code userspace runs.

use aya_ebpf::programs::XdpContext;
use hb_common::{NodeKey, proto};

/// The payload, 8-byte aligned so the compiler reads it in words.
#[repr(C, align(8))]
pub struct Payload(pub [u8; proto::LEN]);

impl Payload {
    /// Copies the payload at `off`, six 8-byte loads (the packet offset is
    /// not aligned; x86-64 and the verifier allow misaligned packet loads,
    /// and `build.rs` tells LLVM so).
    #[inline(always)]
    pub fn load(ctx: &XdpContext, off: usize) -> Option<Payload> {
        let p = crate::parse::at::<{ proto::LEN }>(ctx, off)?.cast::<[u8; 8]>();
        let mut out = Payload([0; proto::LEN]);
        let mut i = 0;
        while i < proto::LEN / 8 {
            // SAFETY: in bounds (checked by `at`); unaligned reads.
            let w = unsafe { core::ptr::read_unaligned(p.add(i).cast::<u64>()) };
            // A volatile store keeps the buffer in memory: otherwise LLVM
            // splits it into 48 single bytes (SROA) and rebuilds every
            // big-endian field with shifts, tripling the program.
            // SAFETY: in bounds of `out`, 8-byte aligned.
            unsafe { core::ptr::write_volatile(out.0.as_mut_ptr().cast::<u64>().add(i), w) };
            i += 1;
        }
        Some(out)
    }
}

/// Gate step 8: `proto::verify`. Inlined (on the hot path); `make_ack`,
/// the second SipHash, is kept out of line instead, because both inlined
/// exceed the verifier's 512-byte stack (SipHash spills many registers).
#[inline(always)]
pub fn verify(key: &NodeKey, buf: &Payload) -> bool {
    proto::verify(key, &buf.0)
}

/// `proto::make_ack` on the payload, as a BPF subprogram (see `verify`):
/// its stack frame is separate from the gate's.
#[inline(never)]
pub fn make_ack(buf: &mut Payload, key: &NodeKey, interval_ms: u32) {
    proto::make_ack(&mut buf.0, key, interval_ms)
}
