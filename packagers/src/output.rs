//! The writer every one-pass format writes through: it counts bytes (so a format knows where
//! it is and what it wrote) and writes runs of zeros without allocating.

use std::io::{self, Write};

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
