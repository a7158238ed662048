//! Recognizing and undoing layer/archive compression by its magic bytes.
//!
//! Owns the choice of decoder. Media types are not trusted for this: Docker archives use
//! their own media types, some tools label gzip layers as plain tar, and a plain tar can
//! carry any name. The first bytes decide (gzip `1f 8b`, zstd `28 b5 2f fd`).

use std::io::{self, BufRead, Read};

use oci_spec::image::MediaType;

/// How a stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members, as `pigz` writes).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Recognizes the compression from the first bytes of a stream.
    pub fn from_magic(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// Peeks at a buffered stream without consuming anything.
    pub fn sniff(reader: &mut dyn BufRead) -> io::Result<Compression> {
        Ok(Compression::from_magic(reader.fill_buf()?))
    }

    /// The OCI layer media type for a layer compressed this way.
    pub fn layer_media_type(self) -> MediaType {
        match self {
            Compression::None => MediaType::ImageLayer,
            Compression::Gzip => MediaType::ImageLayerGzip,
            Compression::Zstd => MediaType::ImageLayerZstd,
        }
    }
}

/// Wraps `reader` in the decoder its first bytes call for.
pub fn decoder<'a>(reader: &'a mut dyn BufRead) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match Compression::sniff(reader)? {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sniffs_and_decodes_each_kind() {
        let plain = b"plain tar bytes".to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&plain[..], 1).unwrap();

        for (bytes, kind) in [
            (&plain, Compression::None),
            (&gz, Compression::Gzip),
            (&zst, Compression::Zstd),
        ] {
            let mut r = io::BufReader::new(&bytes[..]);
            assert_eq!(Compression::sniff(&mut r).unwrap(), kind);
            let mut out = Vec::new();
            decoder(&mut r).unwrap().read_to_end(&mut out).unwrap();
            assert_eq!(out, plain, "{kind:?}");
        }
        assert_eq!(
            Compression::Zstd.layer_media_type(),
            MediaType::ImageLayerZstd
        );
    }
}
