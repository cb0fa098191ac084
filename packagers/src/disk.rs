//! Raw disk images: a GPT with one EFI system partition (UEFI USB sticks). The partition
//! table comes from the `gpt` crate (protective MBR, both headers, CRCs); the file system is
//! a [`FatPlan`] streamed into the partition. GUIDs derive from a given serial, so the same
//! inputs give the same bytes.

use std::{
    fs::File,
    io::{self, BufWriter, Seek, SeekFrom, Write},
    path::Path,
};

use gpt::{
    GptConfig, disk::LogicalBlockSize, mbr::ProtectiveMBR, partition::Partition, partition_types,
};

use crate::fat::{FatError, FatPlan};

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
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes `out`: a GPT disk whose only partition (1, "ctpf-efi") is the ESP `esp`. Returns
/// the image's size.
pub fn write_gpt_esp(out: &Path, esp: &FatPlan, serial: u32) -> Result<u64, DiskError> {
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

/// A fixed GUID per (serial, purpose).
fn guid(serial: u32, purpose: u8) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(b"ctpf");
    bytes[4..8].copy_from_slice(&serial.to_be_bytes());
    bytes[8] = 0x80; // RFC 4122 variant
    bytes[15] = purpose;
    uuid::Builder::from_bytes(bytes).with_version(uuid::Version::Random).into_uuid()
}
