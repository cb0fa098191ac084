//! Hashing input files for build keys and manifests.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ctpf_common::Sha256Digest;
use sha2::{Digest, Sha256};

/// sha256 and size of a file, streamed in 64 KiB reads (kernels and source trees are not
/// read into memory whole).
pub fn file_sha256(path: &Path) -> io::Result<(Sha256Digest, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buffer[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((Sha256Digest::from_bytes(hasher.finalize().into()), size))
}

/// Hashes labelled fields, each length-prefixed so that no two different field lists hash
/// the same bytes. Build keys are made with it.
#[derive(Debug, Default)]
pub struct FieldHasher(Sha256);

impl FieldHasher {
    pub fn field(&mut self, label: &str, value: &[u8]) {
        self.0.update((label.len() as u64).to_le_bytes());
        self.0.update(label.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
    }

    pub fn finish(self) -> Sha256Digest {
        Sha256Digest::from_bytes(self.0.finalize().into())
    }
}
