//! Byte sizes with binary units, as the command line takes them and as logs print them.

use std::fmt;
use std::str::FromStr;

/// A size in bytes. `1G` means 1 GiB: pmem sizes are always powers of two, and decimal units
/// would never produce one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseSizeError {
    #[error("empty size")]
    Empty,
    #[error("'{0}' is not a size: expected a number with an optional unit K, M, G or T (binary: 1G = 1 GiB)")]
    Invalid(String),
    #[error("'{0}' does not fit in 64 bits")]
    Overflow(String),
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(ParseSizeError::Invalid(s.to_string()));
        }
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" | "byte" | "bytes" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(ParseSizeError::Invalid(s.to_string())),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| ParseSizeError::Overflow(s.to_string()))?;
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| ParseSizeError::Overflow(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest binary unit that divides the size exactly, so that a printed size
    /// can be pasted back into `--size` without rounding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];
        let n = self.0;
        for (shift, name) in UNITS {
            let unit = 1u64 << shift;
            if n >= unit && n % unit == 0 {
                return write!(f, "{} {}", n / unit, name);
            }
        }
        write!(f, "{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_units() {
        assert_eq!("1G".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("512M".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("2GiB".parse(), Ok(ByteSize(2 << 30)));
        assert_eq!("4096k".parse(), Ok(ByteSize(4 << 20)));
        assert_eq!("1t".parse(), Ok(ByteSize(1 << 40)));
        assert_eq!("2097152".parse(), Ok(ByteSize(2 << 20)));
        assert_eq!(" 8 M ".parse(), Ok(ByteSize(8 << 20)));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!("".parse::<ByteSize>(), Err(ParseSizeError::Empty));
        assert!(matches!(
            "G".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "1.5G".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "-1G".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "1X".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "99999999999T".parse::<ByteSize>(),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_exact_units() {
        assert_eq!(ByteSize(1 << 30).to_string(), "1 GiB");
        assert_eq!(ByteSize(3 << 20).to_string(), "3 MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536 bytes");
        assert_eq!(ByteSize(0).to_string(), "0 bytes");
    }
}
