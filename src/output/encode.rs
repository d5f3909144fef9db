//! Stream compression of text data files: the bytes a JSONL or CSV encoder
//! produces go through gzip or zstd (or straight through) into the hashing file
//! writer, so the manifest's sha256 and size are those of the file on disk.
//!
//! - `TextEncoder`: a [`Write`] over the chosen compressor; `finish` writes the
//!   compressed stream's trailer and hands the file writer back.
//! - [`decoder`]: the matching reader, for verification and tests.

use std::fs::File;
use std::io::{self, Read, Write};

use super::Compression;
use super::atomic::HashingWriter;

/// zstd level: the library's default, a good speed/size balance for row data.
const ZSTD_LEVEL: i32 = 3;

/// Compresses (or not) into the hashing file writer.
pub(super) enum TextEncoder {
    Plain(HashingWriter<File>),
    Gzip(flate2::write::GzEncoder<HashingWriter<File>>),
    Zstd(zstd::stream::write::Encoder<'static, HashingWriter<File>>),
}

impl TextEncoder {
    /// Starts a compressed stream; `Snappy` is refused (Parquet only).
    pub(super) fn new(inner: HashingWriter<File>, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => TextEncoder::Plain(inner),
            Compression::Gzip => TextEncoder::Gzip(flate2::write::GzEncoder::new(
                inner,
                flate2::Compression::default(),
            )),
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
                // A checksum lets any zstd reader detect a corrupted frame.
                enc.include_checksum(true)?;
                TextEncoder::Zstd(enc)
            }
            Compression::Snappy => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "snappy compression is only available for parquet",
                ));
            }
        })
    }

    /// Ends the compressed stream (trailer, checksum) and returns the file writer.
    pub(super) fn finish(self) -> io::Result<HashingWriter<File>> {
        match self {
            TextEncoder::Plain(w) => Ok(w),
            TextEncoder::Gzip(w) => w.finish(),
            TextEncoder::Zstd(w) => w.finish(),
        }
    }
}

impl Write for TextEncoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            TextEncoder::Plain(w) => w.write(buf),
            TextEncoder::Gzip(w) => w.write(buf),
            TextEncoder::Zstd(w) => w.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            TextEncoder::Plain(w) => w.write_all(buf),
            TextEncoder::Gzip(w) => w.write_all(buf),
            TextEncoder::Zstd(w) => w.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            TextEncoder::Plain(w) => w.flush(),
            TextEncoder::Gzip(w) => w.flush(),
            TextEncoder::Zstd(w) => w.flush(),
        }
    }
}

/// A reader of the decompressed content of `inner` (`Snappy` and `None` read
/// it as is: Parquet files are not stream-compressed).
pub fn decoder<'a, R: Read + 'a>(
    inner: R,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None | Compression::Snappy => Box::new(inner),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(inner)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(inner)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(compression: Compression, data: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let mut enc = TextEncoder::new(HashingWriter::new(file), compression).unwrap();
        enc.write_all(data).unwrap();
        let (_, sha, bytes) = enc.finish().unwrap().into_parts();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(bytes, on_disk.len() as u64);
        assert_eq!(
            sha,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&on_disk))
        );
        let mut out = Vec::new();
        decoder(on_disk.as_slice(), compression)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Every text compression round-trips, and the hash covers the compressed
    /// bytes on disk; gzip and zstd actually compress repetitive rows.
    #[test]
    fn compressions_round_trip() {
        let data = b"{\"order_no\":\"A1\",\"status\":\"paid\"}\n".repeat(1000);
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(round_trip(c, &data), data, "{c}");
        }
        assert!(round_trip(Compression::None, b"").is_empty());
        assert!(round_trip(Compression::Zstd, b"").is_empty());
    }

    /// The compressed files start with their format's magic bytes, so any
    /// standard tool recognises them.
    #[test]
    fn magic_bytes() {
        for (c, magic) in [
            (Compression::Gzip, &[0x1f, 0x8b][..]),
            (Compression::Zstd, &[0x28, 0xb5, 0x2f, 0xfd][..]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let mut enc =
                TextEncoder::new(HashingWriter::new(File::create(&path).unwrap()), c).unwrap();
            enc.write_all(b"x\n").unwrap();
            enc.finish().unwrap();
            assert!(std::fs::read(&path).unwrap().starts_with(magic), "{c}");
        }
    }

    /// Snappy is refused for text.
    #[test]
    fn snappy_is_not_a_text_codec() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        assert!(TextEncoder::new(HashingWriter::new(file), Compression::Snappy).is_err());
    }
}
