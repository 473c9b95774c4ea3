//! `--kernel`: an image file (ELF vmlinux or bzImage) or a kernel build tree, and the
//! `System.map` that names its functions in register dumps and fault messages.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where a kernel build tree keeps its images, in order of preference: the ELF vmlinux
/// boots without decompressing itself (much faster where guest code is emulated), the
/// bzImage when vmlinux is missing or not bootable.
const TREE_IMAGES: [&str; 2] = ["vmlinux", "arch/x86/boot/bzImage"];
const SYSTEM_MAP: &str = "System.map";

/// ELF: magic, 64-bit class, x86-64 machine.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 0x3e;
/// bzImage: the setup header's "HdrS" at 0x202 (Documentation/arch/x86/boot.rst).
const SETUP_HDR_MAGIC_OFFSET: usize = 0x202;
const SETUP_HDR_MAGIC: &[u8; 4] = b"HdrS";

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot open {kind} '{path}'")]
    Open {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{0}' is not a kernel microvm can boot (ELF vmlinux or bzImage)")]
    NotAKernel(PathBuf),
    #[error("kernel tree '{0}' has neither vmlinux nor arch/x86/boot/bzImage (is it built?)")]
    EmptyTree(PathBuf),
}

/// The image to boot and, when found, its System.map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelImage {
    pub image: PathBuf,
    pub system_map: Option<PathBuf>,
}

/// Resolves `--kernel`: a file is the image (System.map looked for beside it); a
/// directory is a build tree (vmlinux or arch/x86/boot/bzImage, and its System.map).
pub fn locate(path: &Path) -> Result<KernelImage, KernelError> {
    let meta = std::fs::metadata(path)
        .map_err(|source| KernelError::Open { kind: "kernel", path: path.to_path_buf(), source })?;
    let (image, map_dir) = if meta.is_dir() {
        let found: Vec<PathBuf> = TREE_IMAGES.iter().map(|i| path.join(i)).filter(|p| p.is_file()).collect();
        let first = found.first().ok_or_else(|| KernelError::EmptyTree(path.to_path_buf()))?;
        let bootable = found.iter().find(|p| matches!(probe(p), Ok(true)));
        match bootable {
            Some(image) => (image.clone(), path.to_path_buf()),
            None => return probe(first).and(Err(KernelError::NotAKernel(first.clone()))),
        }
    } else {
        if !probe(path)? {
            return Err(KernelError::NotAKernel(path.to_path_buf()));
        }
        (path.to_path_buf(), path.parent().unwrap_or(Path::new(".")).to_path_buf())
    };
    let map = map_dir.join(SYSTEM_MAP);
    let system_map = map.is_file().then_some(map);
    tracing::info!(image = %image.display(), system_map = ?system_map, "kernel");
    Ok(KernelImage { image, system_map })
}

/// Opens the kernel or initrd (`kind`) for reading.
pub fn open_file(kind: &'static str, path: &Path) -> Result<File, KernelError> {
    File::open(path).map_err(|source| KernelError::Open { kind, path: path.to_path_buf(), source })
}

/// Does the file start like an image microvm boots (x86-64 ELF, or a bzImage setup header)?
fn probe(path: &Path) -> Result<bool, KernelError> {
    let mut head = Vec::with_capacity(SETUP_HDR_MAGIC_OFFSET + 4);
    open_file("kernel", path)?
        .take(SETUP_HDR_MAGIC_OFFSET as u64 + 4)
        .read_to_end(&mut head)
        .map_err(|source| KernelError::Open { kind: "kernel", path: path.to_path_buf(), source })?;
    let elf = head.len() >= 20
        && head.starts_with(ELF_MAGIC)
        && head[4] == ELFCLASS64
        && u16::from_le_bytes([head[18], head[19]]) == EM_X86_64;
    let bzimage = head.get(SETUP_HDR_MAGIC_OFFSET..) == Some(SETUP_HDR_MAGIC.as_slice());
    Ok(elf || bzimage)
}

/// The initrd must be a readable file.
pub fn check_initrd(path: &Path) -> Result<(), KernelError> {
    open_file("initrd", path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_head() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = ELFCLASS64;
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h
    }

    fn bzimage_head() -> Vec<u8> {
        let mut h = vec![0u8; 1024];
        h[SETUP_HDR_MAGIC_OFFSET..SETUP_HDR_MAGIC_OFFSET + 4].copy_from_slice(SETUP_HDR_MAGIC);
        h
    }

    #[test]
    fn files_and_trees() {
        let dir = std::env::temp_dir().join(format!("mvkernel-{}", std::process::id()));
        let boot = dir.join("arch/x86/boot");
        std::fs::create_dir_all(&boot).unwrap();
        assert!(matches!(locate(&dir), Err(KernelError::EmptyTree(_))));
        std::fs::write(boot.join("bzImage"), bzimage_head()).unwrap();
        // A tree with only a bzImage, no System.map yet.
        assert_eq!(locate(&dir).unwrap(), KernelImage { image: boot.join("bzImage"), system_map: None });
        std::fs::write(dir.join("System.map"), "ffffffff81000000 T _text\n").unwrap();
        assert_eq!(locate(&dir).unwrap().system_map, Some(dir.join("System.map")));
        // A stale, unbootable vmlinux is passed over for the bzImage; a good one is preferred.
        std::fs::write(dir.join("vmlinux"), b"junk").unwrap();
        assert_eq!(locate(&dir).unwrap().image, boot.join("bzImage"));
        std::fs::write(dir.join("vmlinux"), elf_head()).unwrap();
        assert_eq!(locate(&dir).unwrap().image, dir.join("vmlinux"));
        // A plain file: System.map beside it.
        let k = locate(&dir.join("vmlinux")).unwrap();
        assert_eq!(k.system_map, Some(dir.join("System.map")));
        assert_eq!(locate(&boot.join("bzImage")).unwrap().system_map, None);
        // Not kernels.
        std::fs::write(boot.join("bzImage"), b"junk").unwrap();
        std::fs::write(dir.join("vmlinux"), b"junk").unwrap();
        assert!(matches!(locate(&dir), Err(KernelError::NotAKernel(p)) if p == dir.join("vmlinux")));
        let mut elf32 = elf_head();
        elf32[4] = 1;
        std::fs::write(dir.join("vmlinux"), elf32).unwrap();
        assert!(matches!(locate(&dir.join("vmlinux")), Err(KernelError::NotAKernel(_))));
        assert!(matches!(locate(&dir.join("nonexistent")), Err(KernelError::Open { kind: "kernel", .. })));
        assert!(check_initrd(&dir.join("nonexistent")).unwrap_err().to_string().starts_with("cannot open initrd"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
