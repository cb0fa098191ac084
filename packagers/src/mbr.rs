//! MBR partition entries, for the hybrid ISO and the Raspberry Pi image. Written here rather
//! than with a partitioning crate because the hybrid layout needs what those refuse: an entry
//! that starts at sector 0 and overlaps the EFI partition (typed 0, so firmware skips it).

/// Heads and sectors per track of the CHS addresses (isohybrid's geometry: 1 MiB cylinders).
const HEADS: u64 = 64;
const SECTORS_PER_TRACK: u64 = 32;

/// Partition type of a FAT32 file system addressed by LBA (the Raspberry Pi boot partition).
pub const FAT32_LBA: u8 = 0x0C;

/// One 16-byte partition entry for `sectors` 512-byte sectors from `start`.
pub fn entry(bootable: bool, kind: u8, start: u64, sectors: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = if bootable { 0x80 } else { 0 };
    e[1..4].copy_from_slice(&chs(start));
    e[4] = kind;
    let last = (start + sectors).saturating_sub(1);
    e[5..8].copy_from_slice(&chs(last));
    e[8..12].copy_from_slice(&clamp_u32(start).to_le_bytes());
    e[12..16].copy_from_slice(&clamp_u32(sectors).to_le_bytes());
    e
}

/// A whole MBR sector: no boot code, `signature`, up to four entries.
pub fn table(signature: u32, entries: &[[u8; 16]]) -> [u8; 512] {
    let mut mbr = [0u8; 512];
    mbr[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, e) in entries.iter().take(4).enumerate() {
        mbr[446 + 16 * i..462 + 16 * i].copy_from_slice(e);
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

/// Cylinder/head/sector of a sector address; past CHS's reach, the conventional maximum.
fn chs(lba: u64) -> [u8; 3] {
    let cylinder = lba / (HEADS * SECTORS_PER_TRACK);
    if cylinder > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let head = (lba / SECTORS_PER_TRACK) % HEADS;
    let sector = lba % SECTORS_PER_TRACK + 1;
    [head as u8, (sector as u8) | (((cylinder >> 2) & 0xC0) as u8), (cylinder & 0xFF) as u8]
}

fn clamp_u32(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_follows_the_64_by_32_geometry() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(31), [0, 32, 0]);
        assert_eq!(chs(32), [1, 1, 0]);
        assert_eq!(chs(2048), [0, 1, 1]);
        // Cylinder 256 sets bit 6 of the sector byte.
        assert_eq!(chs(256 * 2048), [0, 0x41, 0]);
        assert_eq!(chs(1024 * 2048), [0xFE, 0xFF, 0xFF]);
    }

    #[test]
    fn an_entry_has_its_addresses_little_endian() {
        let e = entry(true, 0xEF, 2048, 4096);
        assert_eq!(e[0], 0x80);
        assert_eq!(e[4], 0xEF);
        assert_eq!(u32::from_le_bytes(e[8..12].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 4096);
        let t = table(0xDEAD_BEEF, &[e]);
        assert_eq!(&t[510..], &[0x55, 0xAA]);
        assert_eq!(&t[446..462], &e);
    }
}
