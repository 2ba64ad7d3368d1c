//! Device sizes: byte sizes with binary units, as the command line takes them and as logs
//! print them, and every rule a device size must follow (a power of two, which QEMU needs for
//! the PCI BAR, of at least [`MIN_SIZE`]), with the message that names the nearest valid sizes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The smallest device the guest can use: one 2 MiB huge page. The Linux driver also needs
/// room for its struct pages, which smaller regions do not leave.
pub const MIN_SIZE: u64 = 2 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("--size {size} is not a power of two, which QEMU needs for the PCI BAR; the nearest valid sizes are {below} and {above}")]
    NotPowerOfTwo {
        size: ByteSize,
        below: ByteSize,
        above: ByteSize,
    },
    #[error("--size {0} is not a power of two, which QEMU needs for the PCI BAR; the largest valid size is {1}")]
    NotPowerOfTwoTooBig(ByteSize, ByteSize),
    #[error("size {0} is below the minimum of {min}", min = ByteSize(MIN_SIZE))]
    TooSmall(ByteSize),
    #[error("the backing file {path} is {size}, which is not a power of two; give --size {above} to extend it")]
    FileNotPowerOfTwo {
        path: PathBuf,
        size: ByteSize,
        above: ByteSize,
    },
}

/// Checks a size asked for with `--size`.
pub fn check_requested(size: u64) -> Result<(), SizeError> {
    if size < MIN_SIZE {
        return Err(SizeError::TooSmall(ByteSize(size)));
    }
    if !size.is_power_of_two() {
        let below = 1u64 << (63 - size.leading_zeros());
        return Err(match below.checked_mul(2) {
            Some(above) => SizeError::NotPowerOfTwo {
                size: ByteSize(size),
                below: ByteSize(below),
                above: ByteSize(above),
            },
            None => SizeError::NotPowerOfTwoTooBig(ByteSize(size), ByteSize(below)),
        });
    }
    Ok(())
}

/// Checks the size of an existing file that is to be used as it is (no `--size`). The message
/// names the `--size` that would extend it, since shrinking is never offered.
pub fn check_file(path: &Path, size: u64) -> Result<(), SizeError> {
    if size < MIN_SIZE {
        return Err(SizeError::TooSmall(ByteSize(size)));
    }
    if !size.is_power_of_two() {
        return Err(SizeError::FileNotPowerOfTwo {
            path: path.to_path_buf(),
            size: ByteSize(size),
            above: ByteSize(size.checked_next_power_of_two().unwrap_or(u64::MAX)),
        });
    }
    Ok(())
}

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
    fn names_nearest_valid_sizes() {
        let e = check_requested(3 << 30).unwrap_err();
        assert_eq!(
            e,
            SizeError::NotPowerOfTwo {
                size: ByteSize(3 << 30),
                below: ByteSize(2 << 30),
                above: ByteSize(4 << 30)
            }
        );
        assert!(e.to_string().contains("2 GiB and 4 GiB"), "{e}");
        assert!(check_requested(2 << 20).is_ok());
        assert_eq!(
            check_requested(1 << 20),
            Err(SizeError::TooSmall(ByteSize(1 << 20)))
        );
        assert!(matches!(check_requested(0), Err(SizeError::TooSmall(_))));
        assert!(matches!(
            check_requested(u64::MAX),
            Err(SizeError::NotPowerOfTwoTooBig(..))
        ));
    }

    #[test]
    fn checks_existing_file_sizes() {
        let p = Path::new("/x");
        assert!(check_file(p, 1 << 30).is_ok());
        let e = check_file(p, 3 << 20).unwrap_err();
        assert!(e.to_string().contains("--size 4 MiB"), "{e}");
        assert!(matches!(check_file(p, 4096), Err(SizeError::TooSmall(_))));
    }

    #[test]
    fn displays_exact_units() {
        assert_eq!(ByteSize(1 << 30).to_string(), "1 GiB");
        assert_eq!(ByteSize(3 << 20).to_string(), "3 MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536 bytes");
        assert_eq!(ByteSize(0).to_string(), "0 bytes");
    }
}
