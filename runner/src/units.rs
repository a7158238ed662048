//! Quantities and durations as pipeline YAML writes them.
//!
//! Owns: turning Kubernetes-style memory quantities (`500Mi`, `1.5Gi`, `2G`, `129e6`), CPU
//! quantities (`400m`, `0.5`, `2`) and Harness timeouts (`10m`, `1h 30m`, `1d`) into numbers,
//! and turning numbers back into that text for messages.
//! Does not own: which YAML keys hold them, defaults, or limits (that is the model and
//! validation), nor applying them to cgroups (that is `supervisor`).
//!
//! Everything here is pure and hand-written: the grammars are tiny, and exact integer
//! arithmetic matters (`1.5Gi` must be exactly 1610612736 bytes, `0.0001` cpu must be refused
//! rather than rounded), which float-based parsers get wrong.

use std::time::Duration;

/// A quantity or duration that could not be read. The message names the text and the
/// accepted form, so it can be shown to the user as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a memory quantity at all.
    #[error(
        "invalid memory quantity {text:?}: use a number with an optional suffix such as 500Mi, 1.5Gi or 2G"
    )]
    Memory { text: String },
    /// `500m` is valid Kubernetes (thousandths of a byte) but never what anyone means.
    #[error(
        "invalid memory quantity {text:?}: 'm' means thousandths of a byte; did you mean {number}Mi or {number}M?"
    )]
    MemoryMilli { text: String, number: String },
    /// Not a CPU quantity.
    #[error("invalid cpu quantity {text:?}: use millicpus such as 400m, or cpus such as 1 or 0.5")]
    Cpu { text: String },
    /// A CPU quantity finer than one millicpu (`0.0001`, `0.5m`).
    #[error("invalid cpu quantity {text:?}: the smallest unit is 1m (a thousandth of a cpu)")]
    CpuPrecision { text: String },
    /// Not a duration.
    #[error(
        "invalid duration {text:?}: use whole numbers with units such as 30s, 10m, 1h30m or 1d (units: ms, s, m, h, d, w)"
    )]
    Duration { text: String },
    /// Zero or negative.
    #[error("{what} {text:?} must be greater than 0")]
    NotPositive { what: &'static str, text: String },
    /// Does not fit in 64 bits.
    #[error("{what} {text:?} is too large")]
    TooLarge { what: &'static str, text: String },
}

const MEMORY: &str = "memory quantity";
const CPU: &str = "cpu quantity";
const DURATION: &str = "duration";

/// A non-negative decimal number kept exactly: `mantissa / 10^frac_digits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: u128,
    frac_digits: u32,
}

/// More digits than this cannot be multiplied by a suffix without overflowing `u128`, and no
/// real quantity needs them.
const MAX_DIGITS: usize = 30;
const MAX_FRAC_DIGITS: u32 = 18;

/// Reads `12`, `1.5`, `.5` or `1.` from the start of `s`; returns the number and the rest.
fn take_decimal(s: &str) -> Option<(Decimal, &str)> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut mantissa: u128 = 0;
    let mut digits = 0usize;
    let mut frac_digits = 0u32;
    let mut seen_dot = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_digit() {
            digits += 1;
            if digits > MAX_DIGITS {
                return None;
            }
            mantissa = mantissa * 10 + u128::from(c - b'0');
            if seen_dot {
                frac_digits += 1;
                if frac_digits > MAX_FRAC_DIGITS {
                    return None;
                }
            }
        } else if c == b'.' && !seen_dot {
            seen_dot = true;
        } else {
            break;
        }
        i += 1;
    }
    if digits == 0 {
        return None;
    }
    Some((
        Decimal {
            mantissa,
            frac_digits,
        },
        &s[i..],
    ))
}

/// Splits an optional leading sign off; `true` when negative.
fn take_sign(s: &str) -> (bool, &str) {
    if let Some(rest) = s.strip_prefix('-') {
        (true, rest)
    } else if let Some(rest) = s.strip_prefix('+') {
        (false, rest)
    } else {
        (false, s)
    }
}

/// The multiplier of a memory suffix, in bytes. Kubernetes accepts only lowercase `k`; we
/// also take `K` because Docker and Harness users write it and the meaning is unambiguous.
/// See: Kubernetes `resource.Quantity` (apimachinery/pkg/api/resource/quantity.go).
fn memory_suffix(suffix: &str) -> Option<u128> {
    Some(match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    })
}

/// Reads a decimal exponent suffix (`e6`, `E-3`, `e+2`). `E` alone is the exa suffix, so an
/// exponent needs at least one digit.
fn take_exponent(s: &str) -> Option<i32> {
    let rest = s.strip_prefix(['e', 'E'])?;
    let (negative, digits) = take_sign(rest);
    if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: i32 = digits.parse().ok()?;
    Some(if negative { -n } else { n })
}

fn pow10(n: u32) -> Option<u128> {
    10u128.checked_pow(n)
}

/// Parses a memory quantity into bytes. Fractions round up to a whole byte, as Kubernetes
/// does (`Quantity.Value()` rounds up).
///
/// Accepts `128974848`, `129e6`, `129M`, `123Mi`, `1.5Gi`, `2G`, `1k`/`1K`, `1Ki`.
/// Rejects empty text, zero, negatives, `m` (milli-bytes) and anything else.
pub fn parse_memory(s: &str) -> Result<u64, UnitError> {
    let text = s.trim();
    let invalid = || UnitError::Memory {
        text: text.to_string(),
    };
    let (negative, unsigned) = take_sign(text);
    let (number, suffix) = take_decimal(unsigned).ok_or_else(invalid)?;

    let (multiplier, divisor_exp) = if let Some(exp) = take_exponent(suffix) {
        let abs = exp.unsigned_abs();
        if exp >= 0 {
            (pow10(abs).ok_or_else(invalid)?, 0)
        } else {
            (1, abs)
        }
    } else if suffix == "m" {
        return Err(UnitError::MemoryMilli {
            text: text.to_string(),
            number: unsigned[..unsigned.len() - 1].to_string(),
        });
    } else {
        (memory_suffix(suffix).ok_or_else(invalid)?, 0)
    };

    if number.mantissa == 0 || negative {
        return Err(UnitError::NotPositive {
            what: MEMORY,
            text: text.to_string(),
        });
    }
    let too_large = || UnitError::TooLarge {
        what: MEMORY,
        text: text.to_string(),
    };
    let numerator = number
        .mantissa
        .checked_mul(multiplier)
        .ok_or_else(too_large)?;
    let divisor = pow10(number.frac_digits + divisor_exp).ok_or_else(invalid)?;
    let bytes = numerator.div_ceil(divisor);
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Parses a CPU quantity into millicpus: `400m` → 400, `1` → 1000, `0.5` → 500, `1.5` → 1500.
///
/// Rejects zero, negatives, anything finer than 1m (`0.0001`, `0.5m`), and other suffixes.
pub fn parse_cpu(s: &str) -> Result<u64, UnitError> {
    let text = s.trim();
    let invalid = || UnitError::Cpu {
        text: text.to_string(),
    };
    let (negative, unsigned) = take_sign(text);
    let (number, suffix) = take_decimal(unsigned).ok_or_else(invalid)?;
    let per_unit: u128 = match suffix {
        "" => 1000,
        "m" => 1,
        _ => return Err(invalid()),
    };
    if number.mantissa == 0 || negative {
        return Err(UnitError::NotPositive {
            what: CPU,
            text: text.to_string(),
        });
    }
    let too_large = || UnitError::TooLarge {
        what: CPU,
        text: text.to_string(),
    };
    let scaled = number
        .mantissa
        .checked_mul(per_unit)
        .ok_or_else(too_large)?;
    let divisor = pow10(number.frac_digits).ok_or_else(invalid)?;
    if !scaled.is_multiple_of(divisor) {
        return Err(UnitError::CpuPrecision {
            text: text.to_string(),
        });
    }
    u64::try_from(scaled / divisor).map_err(|_| too_large())
}

/// Parses a Harness timeout: one or more `<whole number><unit>` groups, optionally separated by
/// spaces (`10m`, `1h 30m`, `1h30m`, `1d`, `2w`, `500ms`). Units: ms, s, m, h, d, w.
///
/// Rejects empty text, a number without a unit (`10`), unknown units, fractions, negatives
/// and zero.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let text = s.trim();
    let invalid = || UnitError::Duration {
        text: text.to_string(),
    };
    let too_large = || UnitError::TooLarge {
        what: DURATION,
        text: text.to_string(),
    };
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let mut total_ms: u64 = 0;
    let mut groups = 0;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let digits_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits_len == 0 || digits_len > 19 {
            return Err(invalid());
        }
        let n: u64 = rest[..digits_len].parse().map_err(|_| too_large())?;
        rest = &rest[digits_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let part = n.checked_mul(unit_ms).ok_or_else(too_large)?;
        total_ms = total_ms.checked_add(part).ok_or_else(too_large)?;
        groups += 1;
    }
    if groups == 0 {
        return Err(invalid());
    }
    if total_ms == 0 || negative {
        return Err(UnitError::NotPositive {
            what: DURATION,
            text: text.to_string(),
        });
    }
    Ok(Duration::from_millis(total_ms))
}

/// Writes `mantissa / 10^scale` with at most `scale` decimals and no trailing zeros.
fn decimal_text(value: u128, scale_pow: u128, max_decimals: u32) -> Option<String> {
    let whole = value / scale_pow;
    let rem = value % scale_pow;
    if rem == 0 {
        return Some(whole.to_string());
    }
    let factor = 10u128.pow(max_decimals);
    let scaled = rem * factor;
    if !scaled.is_multiple_of(scale_pow) {
        return None;
    }
    let frac = format!(
        "{:0width$}",
        scaled / scale_pow,
        width = max_decimals as usize
    );
    Some(format!("{whole}.{}", frac.trim_end_matches('0')))
}

/// Formats bytes for messages: `500Mi`, `1.5Gi`, `2G`, `100`. Picks the shortest text that
/// states the value exactly with a suffix (binary on a tie, up to two decimals), else plain
/// bytes below a million, and otherwise an approximate binary value with one decimal (`1.2Mi`), which is
/// still readable.
pub fn format_memory(bytes: u64) -> String {
    const SUFFIXES: [(&str, u128); 12] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
        ("E", 1_000_000_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("T", 1_000_000_000_000),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("k", 1_000),
    ];
    let b = u128::from(bytes);
    let mut best: Option<String> = None;
    for (suffix, unit) in SUFFIXES {
        if b >= unit
            && let Some(text) = decimal_text(b, unit, 2)
        {
            let text = format!("{text}{suffix}");
            if best.as_ref().is_none_or(|t| text.len() < t.len()) {
                best = Some(text);
            }
        }
    }
    if let Some(text) = best {
        return text;
    }
    if b < 1_000_000 {
        return b.to_string();
    }
    // Only values of a million bytes or more get here, so some binary unit fits.
    let (suffix, unit) = SUFFIXES[..6]
        .iter()
        .copied()
        .find(|(_, unit)| b >= *unit)
        .unwrap_or(("Ki", 1 << 10));
    // Round to one decimal; the caller asked for a message, not a round trip.
    let tenths = (b * 10 + unit / 2) / unit;
    if tenths.is_multiple_of(10) {
        format!("{}{suffix}", tenths / 10)
    } else {
        format!("{}.{}{suffix}", tenths / 10, tenths % 10)
    }
}

/// Formats millicpus the way people write them: `400m`, `1`, `1.5`, `2`, `1250m`.
pub fn format_cpu(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else if milli > 1000 && milli.is_multiple_of(100) {
        format!("{}.{}", milli / 1000, (milli % 1000) / 100)
    } else {
        format!("{milli}m")
    }
}

/// Formats a duration for messages: `150ms` under a second, `2.3s` or `30s` under a minute,
/// and `1h30m`, `2d3h`, `1m5s` above (whole seconds, zero parts left out).
pub fn format_duration(d: Duration) -> String {
    let total_ms = d.as_millis();
    if total_ms == 0 && !d.is_zero() {
        return format!("{}µs", d.as_micros());
    }
    if total_ms < 1000 {
        return if d.is_zero() {
            "0s".to_string()
        } else {
            format!("{total_ms}ms")
        };
    }
    if total_ms < 60_000 {
        let tenths = total_ms / 100;
        return if tenths.is_multiple_of(10) {
            format!("{}s", tenths / 10)
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        let n = secs / len;
        secs %= len;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_binary_suffixes() {
        assert_eq!(parse_memory("500Mi").unwrap(), 524_288_000);
        assert_eq!(parse_memory("1Ki").unwrap(), 1024);
        assert_eq!(parse_memory("1.5Gi").unwrap(), 1_610_612_736);
        assert_eq!(parse_memory("123Mi").unwrap(), 123 * 1024 * 1024);
        assert_eq!(parse_memory("2Ti").unwrap(), 2 << 40);
        assert_eq!(parse_memory("1Pi").unwrap(), 1 << 50);
        assert_eq!(parse_memory("3Ei").unwrap(), 3 << 60);
        assert_eq!(parse_memory(".5Gi").unwrap(), 1 << 29);
    }

    #[test]
    fn memory_decimal_suffixes_and_plain() {
        assert_eq!(parse_memory("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_memory("123M").unwrap(), 123_000_000);
        assert_eq!(parse_memory("129M").unwrap(), 129_000_000);
        assert_eq!(parse_memory("1k").unwrap(), 1000);
        assert_eq!(parse_memory("1K").unwrap(), 1000);
        assert_eq!(parse_memory("1T").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_memory("1P").unwrap(), 1_000_000_000_000_000);
        assert_eq!(parse_memory("1E").unwrap(), 1_000_000_000_000_000_000);
        assert_eq!(parse_memory("128974848").unwrap(), 128_974_848);
        assert_eq!(parse_memory(" 64Mi ").unwrap(), 64 << 20);
        assert_eq!(parse_memory("+1Ki").unwrap(), 1024);
    }

    #[test]
    fn memory_exponent_forms() {
        assert_eq!(parse_memory("129e6").unwrap(), 129_000_000);
        assert_eq!(parse_memory("129E6").unwrap(), 129_000_000);
        assert_eq!(parse_memory("1.5e3").unwrap(), 1500);
        assert_eq!(parse_memory("1e+3").unwrap(), 1000);
        // Fractions of a byte round up, like Kubernetes.
        assert_eq!(parse_memory("15e-1").unwrap(), 2);
        assert_eq!(parse_memory("1.0001k").unwrap(), 1001);
    }

    #[test]
    fn memory_rejects() {
        for bad in [
            "", " ", "Mi", "5Q", "5 Mi", "1.2.3Gi", "abc", "1GiB", "1mi", "1gi", "0x10", "1e",
            "1e999", "..5",
        ] {
            let err = parse_memory(bad).unwrap_err();
            assert!(
                matches!(err, UnitError::Memory { .. } | UnitError::TooLarge { .. }),
                "{bad:?}: {err:?}"
            );
        }
        assert!(matches!(
            parse_memory("0").unwrap_err(),
            UnitError::NotPositive { .. }
        ));
        assert!(matches!(
            parse_memory("0Mi").unwrap_err(),
            UnitError::NotPositive { .. }
        ));
        assert!(matches!(
            parse_memory("-1Gi").unwrap_err(),
            UnitError::NotPositive { .. }
        ));
        assert!(matches!(
            parse_memory("20Ei").unwrap_err(),
            UnitError::TooLarge { .. }
        ));
        assert!(matches!(
            parse_memory("99999999999999999999").unwrap_err(),
            UnitError::TooLarge { .. }
        ));
    }

    #[test]
    fn memory_milli_is_refused_with_a_hint() {
        let err = parse_memory("500m").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid memory quantity \"500m\": 'm' means thousandths of a byte; did you mean 500Mi or 500M?"
        );
    }

    #[test]
    fn memory_error_messages() {
        assert_eq!(
            parse_memory("5Q").unwrap_err().to_string(),
            "invalid memory quantity \"5Q\": use a number with an optional suffix such as 500Mi, 1.5Gi or 2G"
        );
        assert_eq!(
            parse_memory("0").unwrap_err().to_string(),
            "memory quantity \"0\" must be greater than 0"
        );
        assert_eq!(
            parse_memory("20Ei").unwrap_err().to_string(),
            "memory quantity \"20Ei\" is too large"
        );
    }

    #[test]
    fn cpu_forms() {
        assert_eq!(parse_cpu("400m").unwrap(), 400);
        assert_eq!(parse_cpu("1").unwrap(), 1000);
        assert_eq!(parse_cpu("0.5").unwrap(), 500);
        assert_eq!(parse_cpu(".5").unwrap(), 500);
        assert_eq!(parse_cpu("1.5").unwrap(), 1500);
        assert_eq!(parse_cpu("2000m").unwrap(), 2000);
        assert_eq!(parse_cpu("0.001").unwrap(), 1);
        assert_eq!(parse_cpu("1m").unwrap(), 1);
        assert_eq!(parse_cpu("1.0m").unwrap(), 1);
        assert_eq!(parse_cpu(" 2 ").unwrap(), 2000);
        assert_eq!(parse_cpu("0.250").unwrap(), 250);
    }

    #[test]
    fn cpu_rejects() {
        for bad in ["", "m", "1k", "1 m", "abc", "1Mi", "1.2.3", "400M", "1e3"] {
            assert!(
                matches!(parse_cpu(bad).unwrap_err(), UnitError::Cpu { .. }),
                "{bad:?}"
            );
        }
        for zero in ["0", "0m", "0.0", "-1", "-400m"] {
            assert!(
                matches!(parse_cpu(zero).unwrap_err(), UnitError::NotPositive { .. }),
                "{zero:?}"
            );
        }
        for fine in ["0.0001", "0.5m", "1.0005"] {
            assert!(
                matches!(parse_cpu(fine).unwrap_err(), UnitError::CpuPrecision { .. }),
                "{fine:?}"
            );
        }
        assert_eq!(
            parse_cpu("0.0001").unwrap_err().to_string(),
            "invalid cpu quantity \"0.0001\": the smallest unit is 1m (a thousandth of a cpu)"
        );
        assert_eq!(
            parse_cpu("x").unwrap_err().to_string(),
            "invalid cpu quantity \"x\": use millicpus such as 400m, or cpus such as 1 or 0.5"
        );
        assert!(matches!(
            parse_cpu("999999999999999999999999").unwrap_err(),
            UnitError::TooLarge { .. }
        ));
    }

    #[test]
    fn duration_forms() {
        let d = |s| parse_duration(s).unwrap();
        assert_eq!(d("10m"), Duration::from_secs(600));
        assert_eq!(d("1h 30m"), Duration::from_secs(5400));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("1d"), Duration::from_secs(86_400));
        assert_eq!(d("2w"), Duration::from_secs(2 * 7 * 86_400));
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("500ms"), Duration::from_millis(500));
        assert_eq!(d("1m 30s"), Duration::from_secs(90));
        assert_eq!(d("1m30s500ms"), Duration::from_millis(90_500));
        assert_eq!(d(" 2h "), Duration::from_secs(7200));
        assert_eq!(
            d("1w 2d 3h 4m 5s"),
            Duration::from_secs(604_800 + 172_800 + 10_800 + 245)
        );
    }

    #[test]
    fn duration_rejects() {
        for bad in [
            "", "  ", "10", "10x", "m", "1.5h", "1h30", "10 m", "1H", "10mins", "h1",
        ] {
            assert!(
                matches!(parse_duration(bad).unwrap_err(), UnitError::Duration { .. }),
                "{bad:?}"
            );
        }
        for zero in ["0s", "0m 0s", "-5m"] {
            assert!(
                matches!(
                    parse_duration(zero).unwrap_err(),
                    UnitError::NotPositive { .. }
                ),
                "{zero:?}"
            );
        }
        assert!(matches!(
            parse_duration("99999999999999999w").unwrap_err(),
            UnitError::TooLarge { .. }
        ));
        assert_eq!(
            parse_duration("10").unwrap_err().to_string(),
            "invalid duration \"10\": use whole numbers with units such as 30s, 10m, 1h30m or 1d (units: ms, s, m, h, d, w)"
        );
        assert_eq!(
            parse_duration("-5m").unwrap_err().to_string(),
            "duration \"-5m\" must be greater than 0"
        );
    }

    #[test]
    fn format_memory_prefers_exact_text() {
        assert_eq!(format_memory(524_288_000), "500Mi");
        assert_eq!(format_memory(1_610_612_736), "1.5Gi");
        assert_eq!(format_memory(2_000_000_000), "2G");
        assert_eq!(format_memory(1024), "1Ki");
        assert_eq!(format_memory(1000), "1k");
        assert_eq!(format_memory(100), "100");
        assert_eq!(format_memory(1536), "1.5Ki");
        assert_eq!(format_memory(1 << 60), "1Ei");
        assert_eq!(format_memory(u64::MAX), "16Ei");
        // Not exact in either system: approximate, one decimal.
        assert_eq!(format_memory(1_234_567), "1.2Mi");
        assert_eq!(format_memory(1025), "1025");
        assert_eq!(format_memory(999_999), "999999");
        assert_eq!(format_memory(1_000_000), "1M");
        assert_eq!(format_memory(1_048_576), "1Mi");
        assert_eq!(format_memory(1_500_000), "1.5M");
        assert_eq!(format_memory(2_047 << 20), "2047Mi");
    }

    #[test]
    fn format_memory_round_trips_exact_values() {
        for bytes in [
            1u64,
            1000,
            1024,
            1536,
            524_288_000,
            2_000_000_000,
            1 << 40,
            3 << 30,
        ] {
            assert_eq!(parse_memory(&format_memory(bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn format_cpu_forms() {
        assert_eq!(format_cpu(400), "400m");
        assert_eq!(format_cpu(1000), "1");
        assert_eq!(format_cpu(1500), "1.5");
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_cpu(1250), "1250m");
        assert_eq!(format_cpu(500), "500m");
        for m in [1, 400, 1000, 1500, 1250, 2000, 12_300] {
            assert_eq!(parse_cpu(&format_cpu(m)).unwrap(), m);
        }
    }

    #[test]
    fn format_duration_forms() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(2300)), "2.3s");
        assert_eq!(format_duration(Duration::from_millis(2349)), "2.3s");
        assert_eq!(format_duration(Duration::from_millis(150)), "150ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(65)), "1m5s");
        assert_eq!(
            format_duration(Duration::from_secs(86_400 + 3 * 3600)),
            "1d3h"
        );
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_micros(400)), "400µs");
        for text in ["10m", "1h30m", "1d3h", "1m5s", "30s", "150ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
