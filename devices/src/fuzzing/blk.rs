//! virtio-blk: request chains of any shape (raw descriptors, indirect tables, headers and data
//! from the input) parsed and executed against a small in-memory disk, plain or behind a
//! copy-on-write overlay (`--disk PATH,snapshot`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::FromRawFd;
use std::sync::{Arc, OnceLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{check_used, memory, write_image, FuzzQueue, Input, RINGS};
use crate::guest_log::GuestLog;
use crate::virtio::block::handler::BlockHandler;
use crate::virtio::block::overlay::Overlay;
use crate::virtio::block::request::Disk;
use crate::virtio::block::VIRTIO_BLK_ID_BYTES;
use crate::virtio::IrqTrigger;

/// Size of the disk file.
const DISK_BYTES: usize = 4096;

/// The disk: a memfd (nothing left on the host), its contents reset for every input.
fn disk_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        // SAFETY: the name is a valid NUL-terminated string; the call has no other inputs.
        let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: fd is a new, valid file descriptor that nothing else owns.
        unsafe { File::from_raw_fd(fd) }
    })
}

/// Input: disk length (0..=4096 bytes, rounded down to sectors by the device), read-only flag,
/// EVENT_IDX flag, overlay flag, the queue (see [`FuzzQueue::build`]), then the guest memory
/// image. With the overlay flag, the disk is an [`Overlay`] over the 4096-byte file, grown
/// by 64 times the disk length (up to ~260 KiB, so requests cross its 64 KiB chunks).
///
/// Invariants: exactly the completed chains are in the used ring, with heads inside the
/// queue; no used length exceeds what one request can produce (the whole disk, or the ID,
/// plus the status byte); a read-only disk is never modified; an overlay's base never is,
/// and a read-only overlay writes nothing.
pub fn virtio_blk(data: &[u8]) {
    let mut inp = Input::new(data);
    let disk_len = u64::from(inp.u16()) % (DISK_BYTES as u64 + 1);
    let read_only = inp.bool();
    let event_idx = inp.bool();
    let overlay = inp.bool();
    let mem = memory();
    let fq = FuzzQueue::build(&mem, RINGS, &mut inp);
    write_image(&mem, inp.rest());
    let used = fq.used(&mem);

    let file = disk_file();
    let pattern: Vec<u8> = (0..DISK_BYTES).map(|i| (i / 512) as u8 + 1).collect();
    file.set_len(DISK_BYTES as u64).unwrap();
    file.write_all_at(&pattern, 0).unwrap();
    let disk = if overlay {
        let len = DISK_BYTES as u64 + disk_len * 64;
        let o = Overlay::new(file.try_clone().unwrap(), len, &std::env::temp_dir()).unwrap();
        Disk::with_overlay(o, read_only, "fuzz-serial")
    } else {
        Disk::new(file.try_clone().unwrap(), disk_len, read_only, "fuzz-serial")
    };
    let max_len = (disk.nsectors() * 512).max(VIRTIO_BLK_ID_BYTES as u64) + 1;
    let disk = Arc::new(disk);

    let mut handler = BlockHandler::new(
        mem.clone(),
        fq.queue(event_idx),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Arc::new(IrqTrigger::new().unwrap()),
        disk.clone(),
        None,
        Arc::new(GuestLog::new("virtio-blk")),
    );
    let stats = handler.process_queue();
    // At most 63 chains are published, fewer than the budget.
    assert!(!stats.yielded && !stats.throttled, "{stats:?}");
    check_used(&used, &fq, stats.completed, max_len as u32);

    if read_only || overlay {
        let mut after = vec![0u8; DISK_BYTES];
        file.read_exact_at(&mut after, 0).unwrap();
        assert!(after == pattern, "read-only disk or overlay base was modified");
    }
    if let (Some(o), true) = (disk.overlay(), read_only) {
        assert_eq!(o.written_chunks(), 0, "read-only overlay was written");
    }
}
