//! Tiny 64-bit guest payloads, hand-assembled, wrapped in a minimal ELF64 file that
//! microvm loads like a vmlinux. They start in long mode (microvm's boot state) and talk
//! to the devices directly, so the vCPU loop, serial, exit device and MMIO bus can be
//! tested in milliseconds instead of a Linux boot.

use std::path::Path;

/// Where payloads are loaded and entered (physical = virtual: identity mapped).
pub const LOAD_ADDR: u64 = 0x10_0000;
pub const EXIT_DEVICE: u32 = 0xd000_0000;
pub const FIRST_VIRTIO: u32 = 0xd000_1000;

/// An assembler for the handful of instructions the payloads need.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    /// Writes `s` to COM1 (0x3f8), one `out` per byte.
    pub fn print(mut self, s: &str) -> Self {
        self.code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        for b in s.bytes() {
            self.code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
        }
        self
    }

    /// Writes `status` to the exit device: mov eax, addr; mov dword [rax], status.
    pub fn exit(mut self, status: u32) -> Self {
        self.code.push(0xb8);
        self.code.extend_from_slice(&EXIT_DEVICE.to_le_bytes());
        self.code.extend_from_slice(&[0xc7, 0x00]);
        self.code.extend_from_slice(&status.to_le_bytes());
        self
    }

    /// Reads the 32-bit MMIO register at `addr` and prints `yes` if it equals `value`,
    /// `no` otherwise.
    pub fn if_mmio_eq(mut self, addr: u32, value: u32, yes: &str, no: &str) -> Self {
        self.code.push(0xb8); // mov eax, addr
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.compare_at_rax(value, yes, no)
    }

    /// Like `if_mmio_eq`, for the 32-bit value at the address stored at `ptr` (e.g. a
    /// pointer field of the zero page).
    pub fn if_deref_eq(mut self, ptr: u32, value: u32, yes: &str, no: &str) -> Self {
        self.code.extend_from_slice(&[0x8b, 0x04, 0x25]); // mov eax, [ptr]
        self.code.extend_from_slice(&ptr.to_le_bytes());
        self.compare_at_rax(value, yes, no)
    }

    fn compare_at_rax(mut self, value: u32, yes: &str, no: &str) -> Self {
        self.code.extend_from_slice(&[0x8b, 0x18]); // mov ebx, [rax]
        self.code.extend_from_slice(&[0x81, 0xfb]); // cmp ebx, value
        self.code.extend_from_slice(&value.to_le_bytes());
        let yes_code = Asm::default().print(yes).code;
        let no_code = Asm::default().print(no).code;
        // jne no; <yes>; jmp end; no: <no>; end:
        let jmp_len = 2 + yes_code.len();
        self.code.extend_from_slice(&[0x0f, 0x85]); // jne rel32
        self.code.extend_from_slice(&(jmp_len as u32).to_le_bytes());
        self.code.extend_from_slice(&yes_code);
        self.code.extend_from_slice(&[0xeb, no_code.len() as u8]); // jmp rel8
        self.code.extend_from_slice(&no_code);
        self
    }

    /// A 16-bit port write: mov dx, port; mov ax, value; out dx, ax.
    pub fn out16(mut self, port: u16, value: u16) -> Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self.code.extend_from_slice(&[0x66, 0xb8]);
        self.code.extend_from_slice(&value.to_le_bytes());
        self.code.extend_from_slice(&[0x66, 0xef]);
        self
    }

    /// `jmp $` for ever: a guest that is busy, not halted, and never exits.
    pub fn spin(mut self) -> Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }

    /// Raw bytes (e.g. an instruction under test).
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.code.extend_from_slice(b);
        self
    }

    /// hlt in a loop (a payload that never exits on its own).
    pub fn halt(mut self) -> Self {
        self.code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
        self
    }
}

/// Writes `code` as a minimal ELF64 executable: one PT_LOAD at LOAD_ADDR, entry there.
pub fn write_elf(path: &Path, code: &[u8]) {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let offset = (EHDR + PHDR) as u64;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    std::fs::write(path, f).expect("write payload ELF");
}

/// Writes `code` as a minimal bzImage: a 5-sector real-mode setup part carrying the boot
/// protocol header, then the "protected-mode kernel" whose 64-bit entry point (offset 0x200)
/// is `code`. microvm loads it at code32_start = LOAD_ADDR and enters at LOAD_ADDR + 0x200.
pub fn write_bzimage(path: &Path, code: &[u8]) {
    const SETUP_SECTS: u8 = 4;
    let mut f = vec![0u8; (SETUP_SECTS as usize + 1) * 512];
    f[0x1f1] = SETUP_SECTS;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // boot protocol 2.15
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    f.extend_from_slice(&[0xf4; 0x200]); // 32-bit entry area: hlt (never run)
    f.extend_from_slice(code);
    std::fs::write(path, f).expect("write payload bzImage");
}
