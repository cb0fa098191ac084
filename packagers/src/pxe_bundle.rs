//! PXE bundles: the tree a distributor serves over TFTP/HTTP (iPXE binaries per architecture,
//! GRUB `core.0`, the discovery kernel and initrd) as one tar file. The tar is deterministic
//! (sorted paths, one timestamp, owner 0, fixed modes), so its digest versions the bundle.

use std::{collections::BTreeMap, io::Write};

use crate::iso9660::Source;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("writing the bundle: {0}")]
    Io(#[from] std::io::Error),
}

/// A path served by a distributor: `/`-separated parts of `A-Za-z0-9._-`, none empty, none
/// starting with '.', at most 8 deep and 255 bytes (TFTP clients and URLs take them as is).
pub fn check_path(path: &str) -> Result<(), BundleError> {
    let bad = |reason| Err(BundleError::BadPath { path: path.to_owned(), reason });
    if path.is_empty() || path.len() > 255 {
        return bad("must be 1 to 255 bytes");
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > 8 {
        return bad("at most 8 levels deep");
    }
    for part in parts {
        if part.is_empty() || part.starts_with('.') {
            return bad("no empty parts and none starting with '.'");
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return bad("only A-Z, a-z, 0-9, '.', '_' and '-'");
        }
    }
    Ok(())
}

/// Writes `files` as a tar (ustar) to `out`; directories get entries of their own so any
/// tar extracts the tree. Returns the bytes written.
pub fn write_tar<W: Write>(
    files: &BTreeMap<String, Source>,
    timestamp: u64,
    mut out: W,
) -> Result<u64, BundleError> {
    let mut counting = crate::output::Output::new(&mut out);
    let mut tar = tar::Builder::new(&mut counting);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut dirs_done = std::collections::BTreeSet::new();
    for (path, source) in files {
        check_path(path)?;
        let mut parent = String::new();
        for part in path.split('/').rev().skip(1).collect::<Vec<_>>().into_iter().rev() {
            parent.push_str(part);
            parent.push('/');
            if dirs_done.insert(parent.clone()) {
                let mut header = header(tar::EntryType::Directory, 0o755, 0, timestamp);
                tar.append_data(&mut header, &parent, std::io::empty())?;
            }
        }
        let mut header = header(tar::EntryType::Regular, 0o644, source.len(), timestamp);
        match source {
            Source::Bytes(bytes) => tar.append_data(&mut header, path, bytes.as_slice())?,
            Source::File { path: file, .. } => {
                let reader = std::fs::File::open(file)?;
                tar.append_data(&mut header, path, reader)?;
            }
        }
    }
    tar.into_inner()?;
    counting.flush()?;
    Ok(counting.written)
}

fn header(kind: tar::EntryType, mode: u32, size: u64, timestamp: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(timestamp);
    header.set_uid(0);
    header.set_gid(0);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for bad in ["", "../etc/passwd", "a//b", ".hidden", "a/./b", "sp ace", "a\\b", "/abs"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        for good in ["undionly.kpxe", "discovery/x86_64/vmlinuz", "grub/core.0"] {
            check_path(good).unwrap();
        }
    }

    #[test]
    fn bundles_are_deterministic_and_readable() {
        let files: BTreeMap<String, Source> = [
            ("ipxe.efi", b"MZ efi".to_vec()),
            ("discovery/x86_64/vmlinuz", vec![7u8; 5000]),
            ("discovery/x86_64/initrd", vec![1u8; 10]),
        ]
        .into_iter()
        .map(|(p, b)| (p.to_owned(), Source::Bytes(b)))
        .collect();
        let mut first = Vec::new();
        let written = write_tar(&files, 1_700_000_000, &mut first).unwrap();
        assert_eq!(written, first.len() as u64);
        let mut second = Vec::new();
        write_tar(&files, 1_700_000_000, &mut second).unwrap();
        assert_eq!(first, second);

        let mut archive = tar::Archive::new(first.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().mtime().unwrap(), 1_700_000_000);
            seen.push(entry.path().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(
            seen,
            [
                "discovery/",
                "discovery/x86_64/",
                "discovery/x86_64/initrd",
                "discovery/x86_64/vmlinuz",
                "ipxe.efi"
            ]
        );
    }
}
