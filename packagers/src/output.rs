//! The writer every one-pass format writes through: it counts bytes (so a format knows where
//! it is and what it wrote), writes runs of zeros without allocating, and copies files with
//! the kernel's help where the destination allows it.

use std::io::{self, Read, Write};

pub(crate) struct Output<'a, W: Write> {
    inner: &'a mut W,
    pub(crate) written: u64,
}

impl<'a, W: Write> Output<'a, W> {
    pub(crate) fn new(inner: &'a mut W) -> Self {
        Self { inner, written: 0 }
    }

    pub(crate) fn zeros(&mut self, mut n: u64) -> io::Result<()> {
        static BLOCK: [u8; 64 * 1024] = [0u8; 64 * 1024];
        while n > 0 {
            let step = n.min(BLOCK.len() as u64) as usize;
            self.write_all(&BLOCK[..step])?;
            n -= step as u64;
        }
        Ok(())
    }

    /// Copies `reader` to the end of the output. `io::copy` goes to the caller's writer
    /// itself (not through this wrapper, which would hide its type), so a file source and a
    /// `File` or `BufWriter<File>` destination are copied in the kernel (`copy_file_range`,
    /// after the buffer is flushed) instead of through a user-space buffer.
    pub(crate) fn copy_from<R: Read>(&mut self, reader: &mut R) -> io::Result<u64> {
        let copied = io::copy(reader, self.inner)?;
        self.written += copied;
        Ok(copied)
    }

    /// Lets a nested format (a file system inside a disk image) write to the caller's writer
    /// itself, keeping its type for [`Output::copy_from`], and counts the bytes it reports.
    pub(crate) fn write_with<E>(
        &mut self,
        write: impl FnOnce(&mut W) -> Result<u64, E>,
    ) -> Result<u64, E> {
        let written = write(self.inner)?;
        self.written += written;
        Ok(written)
    }

    /// Zeros up to byte `offset` of the output (nothing if already there).
    pub(crate) fn zeros_to(&mut self, offset: u64) -> io::Result<()> {
        self.zeros(offset.saturating_sub(self.written))
    }
}

impl<W: Write> Write for Output<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
