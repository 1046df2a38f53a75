//! Deterministic mutations of a valid input, driven by a recipe of bytes (so `proptest` or a
//! fuzzer can generate the recipe and shrink it): bit flips, overwritten, deleted and
//! duplicated bytes, truncation, and numbers or values of a JSON/TOML document replaced by
//! edge cases (huge, negative, non-finite, of the wrong type).

/// Replacements for a number of the input whose effect stays within a few MiB of memory
/// (0, 1, negative, fractional, and values of the wrong type).
pub const SMALL: &[&str] = &[
    "0", "1", "2", "3", "7", "64", "-1", "0.5", "-0.0", "1e-30", "\"12\"", "null", "true", "[]",
    "{}", "\"\"",
];

/// Replacements that ask for sizes no machine holds or overflow on arithmetic: what a
/// loader must refuse before allocating.
pub const HUGE: &[&str] = &[
    "1000000000000",
    "4611686018427387904",
    "9223372036854775807",
    "18446744073709551615",
    "1e308",
    "1e12",
    "65536",
    "100000000",
    "-9223372036854775808",
];

/// One mutation step is this many recipe bytes: kind, position (2), value.
const STEP: usize = 4;

/// `seed` changed by each 4-byte step of `recipe`, numbers replaced from `numbers`.
pub fn mutate(seed: &[u8], recipe: &[u8], numbers: &[&str]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for step in recipe.chunks_exact(STEP) {
        let (kind, value) = (step[0], step[3]);
        let at = |len: usize| {
            let pos = u16::from_le_bytes([step[1], step[2]]) as usize;
            // Spread 16 bits over the whole input, however long.
            pos * len / (u16::MAX as usize + 1)
        };
        let len = out.len();
        match kind % 8 {
            0 | 1 if len > 0 => out[at(len)] ^= 1 << (value % 8),
            2 if len > 0 => out[at(len)] = value,
            3 => out.truncate(at(len + 1)),
            4 if len > 0 => {
                let from = at(len);
                let to = (from + 1 + value as usize % 16).min(len);
                out.drain(from..to);
            }
            5 if len > 0 => {
                let from = at(len);
                let to = (from + 1 + value as usize % 64).min(len);
                let copy = out[from..to].to_vec();
                out.splice(to..to, copy);
            }
            6 | 7 if !numbers.is_empty() => {
                if let Some((from, to)) = number_near(&out, at(len)) {
                    let new = numbers[value as usize % numbers.len()].as_bytes();
                    out.splice(from..to, new.iter().copied());
                }
            }
            _ => {}
        }
    }
    out
}

/// The byte range of the first number at or after `pos` (wrapping to the start).
fn number_near(bytes: &[u8], pos: usize) -> Option<(usize, usize)> {
    let digit = |b: &u8| b.is_ascii_digit();
    let start = bytes[pos..]
        .iter()
        .position(digit)
        .map(|i| pos + i)
        .or_else(|| bytes.iter().position(digit))?;
    let is_num = |b: &u8| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-');
    let mut from = start;
    while from > 0 && is_num(&bytes[from - 1]) {
        from -= 1;
    }
    let to = start + bytes[start..].iter().take_while(|b| is_num(b)).count();
    Some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_step_changes_the_input_as_said() {
        let seed = br#"{"n_layer": 12, "x": 3}"#;
        assert_eq!(mutate(seed, &[], SMALL), seed);
        assert_eq!(mutate(seed, &[3, 0, 0, 0], SMALL), b"");
        let huge = mutate(seed, &[6, 0, 0, 0], HUGE);
        assert_eq!(huge, br#"{"n_layer": 1000000000000, "x": 3}"#);
        let typed = mutate(seed, &[7, 0xf6, 0xa6, 10], SMALL);
        assert_eq!(typed, br#"{"n_layer": 12, "x": "12"}"#);
        assert_ne!(mutate(seed, &[0, 5, 0, 1], SMALL), seed);
    }
}
