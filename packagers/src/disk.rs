//! Raw disk images: a GPT with one EFI system partition (UEFI USB sticks) and an MBR with one
//! FAT32 partition (Raspberry Pi SD cards and USB sticks, whose boot ROM and firmware read
//! only MBR). The GPT comes from the `gpt` crate (protective MBR, both headers, CRCs), the
//! MBR from [`crate::mbr`]; the file system is a [`FatPlan`] streamed into the partition.
//! GUIDs and disk signatures derive from a given serial, so the same inputs give the same
//! bytes.

use std::{
    fs::File,
    io::{self, BufWriter, Seek, SeekFrom, Write},
    path::Path,
};

use gpt::{
    GptConfig, disk::LogicalBlockSize, mbr::ProtectiveMBR, partition::Partition, partition_types,
};

use crate::{
    fat::{FatError, FatPlan},
    mbr,
    output::Output,
};

const SECTOR: u64 = 512;
/// Partitions start and end on 1 MiB boundaries; the ESP starts at this sector.
pub const ALIGN_SECTORS: u64 = 2048;
/// GPT's partition entry array: 128 entries of 128 bytes, the minimum the spec reserves.
const GPT_ENTRIES: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("partition table: {0}")]
    Gpt(#[from] gpt::GptError),
    #[error("protective MBR: {0}")]
    Mbr(#[from] gpt::mbr::MBRError),
    #[error(transparent)]
    Fat(#[from] FatError),
    #[error("a partition of {sectors} sectors from sector {start} ends past what an MBR addresses")]
    TooLarge { start: u64, sectors: u64 },
    #[error(
        "the file system records {recorded} hidden sectors but its partition starts at {start}"
    )]
    HiddenSectors { recorded: u32, start: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes `out`: a GPT disk whose only partition (1, "ctpf-efi") is the ESP `esp`. Returns
/// the image's size.
pub fn write_gpt_esp(out: &Path, esp: &FatPlan, serial: u32) -> Result<u64, DiskError> {
    check_hidden_sectors(esp)?;
    let esp_sectors = esp.size().div_ceil(SECTOR).div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS;
    // 1 MiB before (MBR, GPT header and entries, alignment) and after (backup GPT).
    let total_sectors = ALIGN_SECTORS + esp_sectors + ALIGN_SECTORS;
    let mut file = File::options().read(true).write(true).create(true).truncate(true).open(out)?;
    file.set_len(total_sectors * SECTOR)?;

    let protective =
        ProtectiveMBR::with_lb_size(u32::try_from(total_sectors - 1).unwrap_or(u32::MAX));
    protective.overwrite_lba0(&mut file)?;
    let mut disk = GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .change_partition_count(true)
        .create_from_device(&mut file, Some(guid(serial, 0x01)))?;
    let mut entries = std::collections::BTreeMap::new();
    entries.insert(
        1,
        Partition {
            part_type_guid: partition_types::EFI,
            part_guid: guid(serial, 0x02),
            first_lba: ALIGN_SECTORS,
            last_lba: ALIGN_SECTORS + esp_sectors - 1,
            flags: 0,
            name: "ctpf-efi".into(),
        },
    );
    for id in 2..=GPT_ENTRIES {
        entries.insert(id, Partition::zero());
    }
    disk.update_partitions(entries)?;
    disk.write()?;

    file.seek(SeekFrom::Start(ALIGN_SECTORS * SECTOR))?;
    let mut writer = BufWriter::with_capacity(1 << 20, &mut file);
    esp.write(&mut writer)?;
    writer.flush()?;
    drop(writer);
    file.sync_all()?;
    Ok(total_sectors * SECTOR)
}

/// Writes `out`: an MBR disk with disk signature `signature` whose only partition (1,
/// bootable, type 0x0C FAT32 LBA, from [`ALIGN_SECTORS`], whole MiB long) holds `part`: the
/// Raspberry Pi layout. Returns the image's size.
pub fn write_mbr_fat(out: &Path, part: &FatPlan, signature: u32) -> Result<u64, DiskError> {
    let mut file = File::create(out)?;
    let mut writer = BufWriter::with_capacity(1 << 20, &mut file);
    let size = stream_mbr_fat(&mut writer, part, signature)?;
    writer.flush()?;
    drop(writer);
    file.sync_all()?;
    Ok(size)
}

/// [`write_mbr_fat`] into any writer, front to back in one pass (so it can also go straight
/// into a pipe or a hash). Returns the bytes written.
pub fn stream_mbr_fat<W: Write>(
    out: &mut W,
    part: &FatPlan,
    signature: u32,
) -> Result<u64, DiskError> {
    check_hidden_sectors(part)?;
    let sectors = part.size().div_ceil(SECTOR).div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS;
    // MBR entries hold 32-bit sector numbers: the partition must end below 2 TiB.
    if ALIGN_SECTORS + sectors > u64::from(u32::MAX) {
        return Err(DiskError::TooLarge { start: ALIGN_SECTORS, sectors });
    }
    let entry = mbr::entry(true, mbr::FAT32_LBA, ALIGN_SECTORS, sectors);
    let mut w = Output::new(out);
    w.write_all(&mbr::table(signature, &[entry]))?;
    w.zeros_to(ALIGN_SECTORS * SECTOR)?;
    w.write_with(|out| part.write(out))?;
    w.zeros_to((ALIGN_SECTORS + sectors) * SECTOR)?;
    w.flush()?;
    Ok(w.written)
}

/// Boot code and some readers find a FAT's sectors through its recorded hidden sectors, so a
/// plan made for another start would be wrong here.
fn check_hidden_sectors(part: &FatPlan) -> Result<(), DiskError> {
    let recorded = part.hidden_sectors();
    if u64::from(recorded) != ALIGN_SECTORS {
        return Err(DiskError::HiddenSectors { recorded, start: ALIGN_SECTORS });
    }
    Ok(())
}

/// A fixed GUID per (serial, purpose).
fn guid(serial: u32, purpose: u8) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(b"ctpf");
    bytes[4..8].copy_from_slice(&serial.to_be_bytes());
    bytes[8] = 0x80; // RFC 4122 variant
    bytes[15] = purpose;
    uuid::Builder::from_bytes(bytes).with_version(uuid::Version::Random).into_uuid()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        fat::{FatKind, FatSpec},
        iso9660::Source,
    };

    fn plan(hidden_sectors: u32) -> FatPlan {
        let files: BTreeMap<String, Source> =
            [("config.txt".to_owned(), Source::Bytes(b"arm_64bit=1\n".to_vec()))].into();
        FatPlan::new(&FatSpec {
            label: "CTPF_RPI".into(),
            volume_id: 1,
            timestamp: 0,
            kind: FatKind::Fat32,
            size: None,
            hidden_sectors,
            files,
        })
        .unwrap()
    }

    #[test]
    fn the_mbr_image_has_one_bootable_fat32_partition_of_whole_mib() {
        let part = plan(ALIGN_SECTORS as u32);
        let mut image = Vec::new();
        let written = stream_mbr_fat(&mut image, &part, 0xC7F0_0004).unwrap();
        assert_eq!(written, image.len() as u64);
        assert_eq!(written % (1024 * 1024), 0);
        assert_eq!(&image[440..444], &0xC7F0_0004u32.to_le_bytes());
        let entry = &image[446..462];
        assert_eq!((entry[0], entry[4]), (0x80, mbr::FAT32_LBA));
        let start = u32::from_le_bytes(entry[8..12].try_into().unwrap());
        let sectors = u32::from_le_bytes(entry[12..16].try_into().unwrap());
        assert_eq!(u64::from(start), ALIGN_SECTORS);
        assert_eq!(u64::from(start + sectors) * SECTOR, written, "the partition ends the disk");
        assert!(image[462..510].iter().all(|b| *b == 0), "one entry only");
        assert!(image[512..(ALIGN_SECTORS * SECTOR) as usize].iter().all(|b| *b == 0));
        let fs = (ALIGN_SECTORS * SECTOR) as usize;
        assert_eq!(&image[fs + 82..fs + 90], b"FAT32   ");
    }

    #[test]
    fn a_file_system_planned_for_another_start_is_refused() {
        let err = stream_mbr_fat(&mut Vec::new(), &plan(0), 1).unwrap_err();
        assert!(matches!(err, DiskError::HiddenSectors { recorded: 0, start: 2048 }), "{err}");
    }
}
