//! Which CPU a kernel image or an ELF file (busybox, the agent, a kernel module) is for, read
//! from the file's own headers, so the discovery recipe can refuse an image whose parts were
//! built for different machines (it would boot and then fail to run `/init`).

use std::io::Read as _;

use ctpf_common::Arch;

/// ELF `e_machine` values (System V ABI).
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
/// PE/COFF machine types (the EFI stub of both kernels makes them PE images).
const IMAGE_FILE_MACHINE_AMD64: u16 = 0x8664;
const IMAGE_FILE_MACHINE_ARM64: u16 = 0xaa64;

/// How many leading bytes of a file [`kernel_arch`] and [`elf_arch`] need at most.
pub const HEADER_BYTES: usize = 64 * 1024;

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at.checked_add(4)?).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The machine of a little-endian ELF file (`e_machine`); 32-bit and big-endian files are not
/// for any machine ctpf boots.
pub fn elf_arch(bytes: &[u8]) -> Result<Arch, &'static str> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("is not an ELF file");
    }
    if bytes.get(4..6) != Some(b"\x02\x01") {
        return Err("is not a 64-bit little-endian ELF file");
    }
    match u16_at(bytes, 0x12) {
        Some(EM_X86_64) => Ok(Arch::X86_64),
        Some(EM_AARCH64) => Ok(Arch::Arm64),
        Some(_) => Err("is an ELF file for a machine other than x86_64 or arm64"),
        None => Err("has a truncated ELF header"),
    }
}

/// The machine of a Linux kernel image: a PE image (the EFI stub, which Debian's x86_64
/// bzImage and arm64 Image both carry, as does an arm64 EFI zboot image) by its COFF machine;
/// otherwise an x86 bzImage by its `HdrS` setup header, an arm64 `Image` by its `ARM\x64`
/// magic, also inside gzip (`Image.gz`).
pub fn kernel_arch(bytes: &[u8]) -> Result<Arch, &'static str> {
    if bytes.get(..2) == Some(b"MZ")
        && let Some(pe) = u32_at(bytes, 0x3c).and_then(|at| usize::try_from(at).ok())
        && bytes.get(pe..pe.saturating_add(4)) == Some(b"PE\0\0")
    {
        return match u16_at(bytes, pe + 4) {
            Some(IMAGE_FILE_MACHINE_AMD64) => Ok(Arch::X86_64),
            Some(IMAGE_FILE_MACHINE_ARM64) => Ok(Arch::Arm64),
            _ => Err("is an EFI (PE) image for a machine other than x86_64 or arm64"),
        };
    }
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(Arch::X86_64);
    }
    if bytes.get(0x38..0x3c) == Some(b"ARM\x64") {
        return Ok(Arch::Arm64);
    }
    if bytes.get(..2) == Some(b"\x1f\x8b") {
        let mut head = Vec::new();
        let _ = flate2::read::GzDecoder::new(bytes).take(0x40).read_to_end(&mut head);
        if head.get(0x38..0x3c) == Some(b"ARM\x64") {
            return Ok(Arch::Arm64);
        }
    }
    Err("is not a Linux kernel image ctpf knows (x86 bzImage or arm64 Image)")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write as _;

    /// The first bytes of a 64-bit little-endian ELF file for `machine`.
    pub(crate) fn elf_header(machine: u16) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        bytes
    }

    /// A minimal kernel image for `arch`: with an EFI stub (PE header) or without.
    pub(crate) fn kernel_image(arch: Arch, efi_stub: bool) -> Vec<u8> {
        let mut bytes = vec![0u8; 0x300];
        match arch {
            Arch::X86_64 => bytes[0x202..0x206].copy_from_slice(b"HdrS"),
            Arch::Arm64 => bytes[0x38..0x3c].copy_from_slice(b"ARM\x64"),
        }
        if efi_stub {
            let machine = match arch {
                Arch::X86_64 => IMAGE_FILE_MACHINE_AMD64,
                Arch::Arm64 => IMAGE_FILE_MACHINE_ARM64,
            };
            bytes[..2].copy_from_slice(b"MZ");
            bytes[0x3c..0x40].copy_from_slice(&0x100u32.to_le_bytes());
            bytes[0x100..0x104].copy_from_slice(b"PE\0\0");
            bytes[0x104..0x106].copy_from_slice(&machine.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn elf_machines() {
        assert_eq!(elf_arch(&elf_header(EM_X86_64)), Ok(Arch::X86_64));
        assert_eq!(elf_arch(&elf_header(EM_AARCH64)), Ok(Arch::Arm64));
        assert!(elf_arch(&elf_header(40)).unwrap_err().contains("other than")); // EM_ARM
        assert!(elf_arch(b"#!/bin/sh\n").unwrap_err().contains("not an ELF"));
        assert!(elf_arch(b"\x7fELF\x01\x01").unwrap_err().contains("64-bit"));
        assert!(elf_arch(b"\x7fELF\x02\x01\0\0").unwrap_err().contains("truncated"));
    }

    #[test]
    fn kernel_machines() {
        for arch in Arch::ALL {
            assert_eq!(kernel_arch(&kernel_image(arch, true)), Ok(arch));
            assert_eq!(kernel_arch(&kernel_image(arch, false)), Ok(arch));
        }
        // An arm64 EFI zboot image: a PE image, compressed payload, no Image magic at 0x38.
        let mut zboot = kernel_image(Arch::Arm64, true);
        zboot[0x38..0x3c].fill(0);
        zboot[4..8].copy_from_slice(b"zimg");
        assert_eq!(kernel_arch(&zboot), Ok(Arch::Arm64));
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&kernel_image(Arch::Arm64, false)).unwrap();
        assert_eq!(kernel_arch(&gzip.finish().unwrap()), Ok(Arch::Arm64));
        assert!(kernel_arch(b"kernel").unwrap_err().contains("not a Linux kernel"));
        let mut riscv = kernel_image(Arch::Arm64, true);
        riscv[0x104..0x106].copy_from_slice(&0x5064u16.to_le_bytes());
        assert!(kernel_arch(&riscv).unwrap_err().contains("other than"));
    }
}
